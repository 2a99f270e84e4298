"""Norms and the MLP. Parameter names follow docs/architecture.md (weight/bias; dense_h_to_4h/dense_4h_to_h or
w1/w3/w2 for gated activations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.schema import ModelConfig
from neox.config.shapes import default_intermediate_size, intermediate_size, is_gated  # noqa: F401  (re-exported)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (+ bias). eps sits inside the sqrt as in LLaMA / torch's fused kernel;
    GPT-NeoX adds it to the rms instead, which differs by O(eps) only."""

    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return y if self.bias is None else y + self.bias


class ScaleNorm(nn.Module):
    """x / max(||x||, eps) * g with a single learned scalar g (Nguyen & Salazar, 2019), stored as `weight`."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=self.eps)
        return x / norm * self.weight


def build_norm(cfg: ModelConfig) -> nn.Module:
    dim = cfg.hidden_size
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.layernorm_epsilon, bias=cfg.use_bias_in_norms)
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.rms_norm_epsilon, bias=cfg.use_bias_in_norms)
    if cfg.norm == "scalenorm":
        return ScaleNorm(cfg.scalenorm_epsilon)
    raise ValueError(f"unknown norm {cfg.norm!r}")


# Activation applied to the hidden layer (non-gated) or to the gate projection w1 (gated).
ACTIVATION_FNS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "geglu": F.gelu,
    "swiglu": F.silu,
    "reglu": F.relu,
}


class MLP(nn.Module):
    """Non-gated: dense_4h_to_h(act(dense_h_to_4h(x))). Gated (GPT-NeoX LLaMA naming): w2(act(w1(x)) * w3(x))."""

    def __init__(self, cfg: ModelConfig, width: int | None = None, bias: bool | None = None):
        """width and bias default to the config's; MoE shared experts set their own."""
        super().__init__()
        h = cfg.hidden_size
        inter = intermediate_size(cfg) if width is None else width
        bias = cfg.use_bias_in_mlp if bias is None else bias
        self.act = ACTIVATION_FNS[cfg.activation]
        self.gated = is_gated(cfg)
        if self.gated:
            self.w1 = nn.Linear(h, inter, bias=bias)
            self.w3 = nn.Linear(h, inter, bias=bias)
            self.w2 = nn.Linear(inter, h, bias=bias)
        else:
            self.dense_h_to_4h = nn.Linear(h, inter, bias=bias)
            self.dense_4h_to_h = nn.Linear(inter, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.w2(self.act(self.w1(x)) * self.w3(x))
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))
