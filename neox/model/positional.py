"""Positional encodings: learned (a plain nn.Embedding in GPT), sinusoidal, rotary, ALiBi and T5 relative buckets.

Every encoding is computed from explicit position ids, so left-padded batches, KV-cache decoding and
reset_position_ids all see the same positions a full forward pass would.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn


class _DerivedTables(nn.Module, metaclass=abc.ABCMeta):
    """Holds fp32 tables derived from hyper-parameters (non-persistent buffers, so not in the state dict).

    `model.to(torch.bfloat16)` would round the tables to bf16 and `to_empty()` (meta-device init) would leave
    them as garbage, so after every `_apply` they are rebuilt in fp32 on whatever device the module is now on.
    """

    @abc.abstractmethod
    def _build(self, device: torch.device) -> None:
        """(Re)compute the fp32 tables on `device`."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = next(self.buffers()).device
        self._build(device)
        return self


class SinusoidalEmbedding(_DerivedTables):
    """Fixed sin/cos table added to the token embeddings (Vaswani et al.): [sin(p*w_0..), cos(p*w_0..)]."""

    def __init__(self, dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.max_positions, self.base = dim, max_positions, base
        self._build(torch.device("cpu"))

    def _build(self, device):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))
        angles = torch.outer(torch.arange(self.max_positions, device=device, dtype=torch.float32), inv_freq)
        table = torch.cat([angles.sin(), angles.cos()], dim=-1)[:, : self.dim]
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


class RotaryEmbedding(_DerivedTables):
    """Rotary tables for the first `rotary_ndims` dims of each head, GPT-NeoX / HF GPTNeoX layout:
    inv_freq_i = base^(-2i/rotary_ndims), cos/sin tables are the frequencies repeated twice (rotate_half style)."""

    def __init__(self, rotary_ndims: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        self.rotary_ndims, self.max_positions, self.base = rotary_ndims, max_positions, base
        self._build(torch.device("cpu"))

    def _build(self, device):
        d = self.rotary_ndims
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(self.max_positions, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` [B|1, T] in `dtype`, shaped [B|1, T, 1, 1, rotary_ndims] to broadcast over the
        fused qkv view [B, T, kv_groups, heads_per_group, head_dim]. Cast once per forward, not once per layer."""
        cos = self.cos[positions].to(dtype)[:, :, None, None, :]
        sin = self.sin[positions].to(dtype)[:, :, None, None, :]
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of the last axis of x; the rest pass through unchanged."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head ALiBi slopes (Press et al.): a geometric sequence starting at 2^(-8/n) for a power-of-two n;
    otherwise the slopes of the nearest lower power of two followed by every other slope of twice that."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


class ALiBi(_DerivedTables):
    """Linear attention bias -slope_h * (query position - key position); shared by every layer."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self._build(torch.device("cpu"))

    def _build(self, device):
        slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32, device=device)
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos [B|1, T], k_pos [B|1, S] -> fp32 bias [B|1, H, T, S]."""
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).float()
        return -self.slopes[None, :, None, None] * distance[:, None]


def t5_relative_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Causal T5 bucket of (key position - query position): distances 0..num_buckets/2-1 get their own bucket,
    larger ones share log-spaced buckets up to max_distance, and keys in the future count as distance 0."""
    n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # clamp(min=1) only keeps log() finite for the small distances, whose value `where` discards
    scaled = torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """Learned per-layer T5 bias: one scalar per (bucket, head) added to the attention scores, times
    sqrt(head_dim) as GPT-NeoX scales it, so GPT-NeoX bias tables mean the same here."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.scale = math.sqrt(head_dim)
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """bucket ids [B|1, T, S] -> bias [B|1, H, T, S]."""
        return self.relative_attention_bias(buckets).permute(0, 3, 1, 2) * self.scale
