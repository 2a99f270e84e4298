"""LocalRunner: the output layer and the loss as one node where the head is a plain matmul, the same numbers."""

from __future__ import annotations

import pytest
import torch

from neox.config.schema import PrecisionConfig
from neox.model import GPT
from neox.parallel.runner import LocalRunner
from neox.train import loss as L
from neox.train.precision import Precision

from ..infer.tiny import tiny_config


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 384, (2, 17), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16)}


def _step(model, precision: str) -> tuple[torch.Tensor, dict]:
    runner = LocalRunner(
        model, Precision(PrecisionConfig(precision=precision)), torch.device("cpu"), loss_fn=L.masked_mean_loss
    )
    model.zero_grad(set_to_none=True)
    loss = runner.forward_backward([_batch(0), _batch(1)])
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_output_layer_gives_the_separate_layers_numbers(monkeypatch, tied, precision):
    torch.manual_seed(0)
    model = GPT(tiny_config(no_weight_tying=not tied).model)
    assert model.head_weight() is (model.embed_in.weight if tied else model.embed_out.weight)
    calls = []
    fused = L.linear_masked_mean_loss
    monkeypatch.setattr(L.masked_mean_loss, "with_head", lambda *a: calls.append(1) or fused(*a))
    loss, grads = _step(model, precision)
    assert len(calls) == 2  # one per micro-batch
    monkeypatch.delattr(L.masked_mean_loss, "with_head")
    loss_ref, grads_ref = _step(model, precision)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=0, atol=0, msg=name)


def test_a_head_with_hooks_or_another_type_is_left_to_the_model():
    model = GPT(tiny_config(no_weight_tying=True).model)
    handle = model.embed_out.register_forward_hook(lambda m, i, o: o)  # as LoRA's adapter is added
    assert model.head_weight() is None
    handle.remove()
    assert model.head_weight() is model.embed_out.weight
    model.embed_out = torch.nn.Sequential(model.embed_out)
    assert model.head_weight() is None
