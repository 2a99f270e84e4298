"""Activation checkpointing: every granularity gives the loss and gradients of the plain model (fp32, dropout on
and seeded), really recomputes what it says, keeps fewer activations, and leaves parameter names alone."""

from __future__ import annotations

import copy

import pytest
import torch

from neox.config import from_dict
from neox.config.schema import ModelConfig, TrainConfig
from neox.errors import ConfigError
from neox.model import GPT
from neox.parallel import activation_checkpoint

MODEL = ModelConfig(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    seq_length=16,
    vocab_size=64,
    hidden_dropout=0.1,
    attention_dropout=0.1,
)
MODES = [("full", 1), ("full", 2), ("full", 3), ("selective_attention", 1), ("selective_op", 1)]


def train_cfg(kind: str | None, n: int = 1) -> TrainConfig:
    if kind is None:
        return TrainConfig()
    return TrainConfig(checkpoint_activations=True, checkpoint_granularity=kind, checkpoint_num_layers=n)


def loss_and_grads(model: GPT, steps: int = 2):
    """Two SGD steps on fixed batches with dropout drawn from a fixed seed; the losses and last gradients."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        data = torch.randint(0, 64, (2, 17), generator=g)
        torch.manual_seed(5)
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), grads


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return GPT(MODEL)


@pytest.fixture(scope="module")
def plain(base):
    return loss_and_grads(copy.deepcopy(base))


@pytest.mark.parametrize("kind,n", MODES)
def test_losses_and_gradients_equal_the_plain_model(base, plain, kind, n):
    model = activation_checkpoint.apply(copy.deepcopy(base), train_cfg(kind, n))
    losses, grads = loss_and_grads(model)
    ref_losses, ref_grads = plain
    assert torch.equal(losses, ref_losses), (losses, ref_losses)
    assert grads.keys() == ref_grads.keys()  # names unchanged
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-7, msg=name)


def _calls(model: GPT) -> dict[str, int]:
    """Forward calls of each block's attention and MLP, counted by hooks on their output projections (a
    recomputation may call a module's forward directly, bypassing hooks on the module itself)."""
    counts = {"attention": 0, "mlp": 0}
    for block in model.layers.values():
        for part, layer in (("attention", block.attention.dense), ("mlp", block.mlp.dense_4h_to_h)):

            def hook(*_, part=part):
                counts[part] += 1

            layer.register_forward_pre_hook(hook)  # (early-stopping recomputation ends inside the last op)
    return counts


@pytest.mark.parametrize(
    "kind,n,attention,mlp",
    # 4 blocks, one forward + backward: calls of attention and MLP over all blocks
    [
        (None, 1, 4, 4),
        ("full", 1, 8, 8),
        ("full", 2, 8, 8),
        ("selective_attention", 1, 8, 4),
        ("selective_op", 1, 8, 8),
    ],
)
def test_what_is_recomputed(base, kind, n, attention, mlp):
    model = activation_checkpoint.apply(copy.deepcopy(base), train_cfg(kind, n))
    counts = _calls(model)
    model(torch.zeros(1, 16, dtype=torch.long)).sum().backward()
    assert counts == {"attention": attention, "mlp": mlp}


def _saved_bytes(model: GPT) -> int:
    """Bytes autograd keeps for the backward pass outside checkpointed regions (inside them the checkpoint keeps
    nothing but its inputs), counted by an outer saved-tensor hook."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(2, 16, dtype=torch.long)).sum().backward()
    return total


def test_full_checkpointing_keeps_less_and_groups_keep_less_still(base):
    none = _saved_bytes(copy.deepcopy(base))
    per_block = _saved_bytes(activation_checkpoint.apply(copy.deepcopy(base), train_cfg("full", 1)))
    pairs = _saved_bytes(activation_checkpoint.apply(copy.deepcopy(base), train_cfg("full", 2)))
    attention = _saved_bytes(activation_checkpoint.apply(copy.deepcopy(base), train_cfg("selective_attention")))
    assert pairs < per_block < attention < none


def test_off_leaves_the_model_alone(base):
    model = copy.deepcopy(base)
    forwards = [b.forward for b in model.layers.values()]
    activation_checkpoint.apply(model, TrainConfig())
    assert [b.forward for b in model.layers.values()] == forwards


def test_groups_of_blocks_are_refused_under_fsdp(base):
    with pytest.raises(ConfigError, match="checkpoint_num_layers"):
        activation_checkpoint.apply(copy.deepcopy(base), train_cfg("full", 2), fsdp=True)


@pytest.mark.parametrize(
    "train,match",
    [
        ({"checkpoint_granularity": "selective_op"}, "needs train.checkpoint_activations"),
        ({"checkpoint_num_layers": 2}, "needs train.checkpoint_activations"),
        ({"checkpoint_activations": True, "checkpoint_num_layers": 0}, "at least 1"),
        (
            {"checkpoint_activations": True, "checkpoint_num_layers": 2, "checkpoint_granularity": "selective_op"},
            "apply to checkpoint_granularity: full",
        ),
        ({"checkpoint_activations": True, "checkpoint_granularity": "some"}, "checkpoint_granularity"),
    ],
)
def test_bad_settings_are_one_line_errors(train, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict({"train": train})
    assert "\n" not in str(e.value)


def test_gpt_neox_keys():
    cfg = from_dict({"checkpoint_activations": True, "checkpoint_num_layers": 2})
    assert (cfg.train.checkpoint_activations, cfg.train.checkpoint_num_layers) == (True, 2)
