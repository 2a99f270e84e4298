"""Norms and MLP activations against their direct formulas; the intermediate-size rule."""

import pytest
import torch
import torch.nn.functional as F

from neox.config.schema import ACTIVATIONS, GATED_ACTIVATIONS, ModelConfig
from neox.model.layers import MLP, build_norm, default_intermediate_size


def test_layernorm_formula():
    cfg = ModelConfig(hidden_size=16, norm="layernorm", layernorm_epsilon=1e-3)
    norm = build_norm(cfg)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(3, 5, 16) * 4 + 1
    want = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-3)
    torch.testing.assert_close(norm(x), want * norm.weight + norm.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_rmsnorm_formula(bias):
    cfg = ModelConfig(hidden_size=16, norm="rmsnorm", rms_norm_epsilon=1e-2, use_bias_in_norms=bias)
    norm = build_norm(cfg)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16) * 0.1
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2) * norm.weight
    torch.testing.assert_close(norm(x), want + (norm.bias if bias else 0), atol=1e-5, rtol=1e-5)
    assert (norm.bias is not None) == bias


def test_scalenorm_formula():
    norm = build_norm(ModelConfig(hidden_size=16, norm="scalenorm", scalenorm_epsilon=1e-3))
    with torch.no_grad():
        norm.weight.fill_(2.5)
    x = torch.randn(3, 5, 16)
    x[0, 0] = 0.0  # below eps: divided by eps, not by zero
    want = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-3) * 2.5
    torch.testing.assert_close(norm(x), want)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


FORMULAS = {
    "gelu": lambda a: 0.5 * a * (1 + torch.erf(a / 2**0.5)),
    "relu": lambda a: a.clamp(min=0),
    "silu": lambda a: a * torch.sigmoid(a),
    "swish": lambda a: a * torch.sigmoid(a),
    "mish": lambda a: a * torch.tanh(F.softplus(a)),
}
FORMULAS.update({"geglu": FORMULAS["gelu"], "swiglu": FORMULAS["silu"], "reglu": FORMULAS["relu"]})


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_activation_formula(activation):
    cfg = ModelConfig(hidden_size=8, intermediate_size=12, activation=activation)
    mlp = MLP(cfg)
    x = torch.randn(2, 3, 8)
    act = FORMULAS[activation]
    if activation in GATED_ACTIVATIONS:
        want = F.linear(
            act(F.linear(x, mlp.w1.weight, mlp.w1.bias)) * F.linear(x, mlp.w3.weight, mlp.w3.bias),
            mlp.w2.weight,
            mlp.w2.bias,
        )
        names = {"w1.weight", "w1.bias", "w3.weight", "w3.bias", "w2.weight", "w2.bias"}
    else:
        hidden = act(x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias)
        want = hidden @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
        names = {"dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight", "dense_4h_to_h.bias"}
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    assert {n for n, _ in mlp.named_parameters()} == names


def test_mlp_bias_toggle_and_width():
    mlp = MLP(ModelConfig(hidden_size=8, activation="swiglu", use_bias_in_mlp=False))
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
    assert mlp.w1.weight.shape == (256, 8)


def test_default_intermediate_size():
    assert default_intermediate_size(ModelConfig(hidden_size=512, activation="gelu")) == 2048
    # gated: 8/3 * 4096 = 10922.67 -> 10922 -> next multiple of 256 = 11008 (LLaMA-7B's width)
    assert default_intermediate_size(ModelConfig(hidden_size=4096, activation="swiglu")) == 11008
    assert default_intermediate_size(ModelConfig(hidden_size=768, activation="geglu")) == 2048
    assert default_intermediate_size(ModelConfig(hidden_size=64, activation="reglu")) == 256
