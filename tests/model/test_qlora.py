"""4-bit base layers (neox.model.qlora): the forward and input gradient of the dequantised weight, nothing
of weight size kept for backward, adapters moved over intact, and the way back to nn.Linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neox.kernels import nf4
from neox.model.lora import apply_lora, is_adapter_key, merge_lora_
from neox.model.qlora import Linear4bit, dequantize_base_, is_quantized_key, quantize_base_, quantized_bytes


def layer(kind="nf4", double_quant=False, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias)
    return lin, Linear4bit(lin, kind, double_quant)


@pytest.mark.parametrize("kind", nf4.KINDS)
def test_forward_and_input_gradient_use_the_dequantised_weight(kind):
    lin, q = layer(kind)
    w = nf4.dequantize(nf4.quantize(lin.weight, kind), lin.weight.shape, kind, torch.float32)
    x = torch.randn(4, 96, requires_grad=True)
    y = q(x)
    want = F.linear(x, w, lin.bias)
    assert torch.allclose(y, want, atol=1e-6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(gx, g @ w, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())


def test_nothing_of_weight_size_is_kept_for_backward():
    _, q = layer(bias=False)
    saved = []
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        q(x).sum().backward()
    assert sum(saved) < 96 * 80 // 8, saved  # a full-precision copy of W would be 7680 elements


def test_autocast_runs_the_matmul_in_its_dtype():
    _, q = layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(torch.randn(2, 96)).dtype == torch.bfloat16


def tiny_gpt():
    from neox.config.schema import ModelConfig
    from neox.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16, vocab_size=64)
    cfg.pos_emb, cfg.no_weight_tying = "rotary", True
    from neox.config import from_dict, to_dict
    from neox.config.schema import Config

    d = to_dict(Config(model=cfg))
    return GPT(from_dict(d).model)


@pytest.mark.parametrize("everything", [False, True])
def test_quantize_base_keeps_names_and_adapters(everything):
    model = tiny_gpt()
    apply_lora(model, 4, 8.0, 0.0, ["query_key_value", "dense"])
    for _, m in model.named_modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B)  # a non-zero adapter, so that it shows in the output
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = quantize_base_(model, "nf4", double_quant=True, everything=everything)
    linears = sum(isinstance(m, nn.Linear) for m in tiny_gpt().modules())
    assert n == (linears if everything else 4)
    assert quantize_base_(model, "nf4", True, everything) == 0  # once is enough
    sd = model.state_dict()
    adapters = {k for k in before if is_adapter_key(k)}
    assert adapters <= set(sd) and all(torch.equal(sd[k], before[k]) for k in adapters)
    gone = {k for k in before if k not in sd}
    assert all(k.endswith(".weight") for k in gone) and len(gone) == n
    assert all(is_quantized_key(k) for k in set(sd) - set(before))
    stored, weights = quantized_bytes(model)
    assert 0.5 < stored / weights < 0.53  # 4 bits + double-quantised maxima
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = model(ids)
        assert dequantize_base_(model) == n
        assert all(type(m) is not Linear4bit for m in model.modules())
        assert torch.allclose(model(ids), want, atol=1e-6)
        assert merge_lora_(model) == 4
        assert (model(ids) - want).abs().max().item() < 1e-5


def test_a_tied_head_is_left_in_full_precision():
    from neox.config import from_dict, to_dict
    from neox.config.schema import Config, ModelConfig
    from neox.model import GPT

    d = to_dict(Config(model=ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16)))
    d["model"].update(vocab_size=64, no_weight_tying=False)
    model = GPT(from_dict(d).model)
    quantize_base_(model, "nf4", everything=True)
    assert "embed_in.weight" in model.state_dict()
