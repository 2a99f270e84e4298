"""Positional encodings: learned (a plain nn.Embedding in GPT), sinusoidal, rotary, ALiBi and T5 relative buckets.

Every encoding is computed from explicit position ids, so left-padded batches, KV-cache decoding and
reset_position_ids all see the same positions a full forward pass would.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from neox.config.rope import RopeScaling, parse_rope_scaling


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


def rotary_inv_freq(dim: int, base: float) -> torch.Tensor:
    """inv_freq_i = base^(-2i/dim), i < dim/2, in fp32 (the exponent too, as transformers computes it)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (1 when nothing is stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # wavelengths longer than original/low_freq_factor are interpolated by the factor, shorter than
    # original/high_freq_factor kept, and those between blended linearly in original/wavelength
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, out)


def _yarn(dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    # dims that turn fewer than beta_slow times over the original context are interpolated, those that turn
    # more than beta_fast times extrapolated (kept), with a linear ramp over the dims in between
    def dim_of(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (the original frequency), 0 = interpolate (divided by the factor)
    inv_freq = rotary_inv_freq(dim, base)
    inv_freq = inv_freq / s.factor * (1 - keep) + inv_freq * keep
    if s.attention_factor is not None:
        return inv_freq, s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return inv_freq, yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return inv_freq, yarn_mscale(s.factor)


def scaled_inv_freq(dim: int, base: float, s: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], cos/sin multiplier) of a static scaling method (or none); `dynamic` starts from the
    unscaled frequencies and changes them per forward (`dynamic_inv_freq`)."""
    if s is None or s.type == "dynamic":
        return rotary_inv_freq(dim, base), 1.0
    if s.type == "linear":
        return rotary_inv_freq(dim, base) / s.factor, 1.0
    if s.type == "llama3":
        return _llama3(rotary_inv_freq(dim, base), s), 1.0
    if s.type == "yarn":
        return _yarn(dim, base, s)
    raise ValueError(f"unknown rope scaling {s.type!r}")


def dynamic_inv_freq(dim: int, base: float, s: RopeScaling, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK: for a forward reaching seq_len > the original context, the base grows to
    base * (factor * seq_len / original - (factor - 1)) ^ (dim / (dim - 2)); seq_len is a 0-d tensor (no sync)."""
    ratio = s.factor * seq_len.float() / s.original_max_position_embeddings - (s.factor - 1)
    grown = base * ratio ** (dim / (dim - 2))
    return 1.0 / (grown ** (torch.arange(0, dim, 2, dtype=torch.float32, device=seq_len.device) / dim))


class RotaryEmbedding(_DerivedTables):
    """Rotary tables for the first `rotary_ndims` dims of each head, GPT-NeoX / HF GPTNeoX layout:
    inv_freq_i = base^(-2i/rotary_ndims), cos/sin tables are the frequencies repeated twice (rotate_half style).

    `scaling` (model.rope_scaling) changes the frequencies as transformers' rope_scaling does: linear, llama3
    and yarn once in the tables (yarn also scales cos/sin by its attention factor); dynamic NTK per forward,
    from the largest position the forward reaches, for positions past the original context."""

    def __init__(self, rotary_ndims: int, max_positions: int, base: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.rotary_ndims, self.max_positions, self.base = rotary_ndims, max_positions, base
        self.scaling = parse_rope_scaling(scaling, max_positions) if isinstance(scaling, dict) else scaling
        self._build(torch.device("cpu"))

    def _build(self, device):
        # computed on `device` itself: under a meta-device build (train/build.py) the defaults are meta tensors
        with torch.device(device):
            inv_freq, attention_factor = scaled_inv_freq(self.rotary_ndims, self.base, self.scaling)
            angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.attention_factor = attention_factor
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * attention_factor, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` [B|1, T] in `dtype`, shaped [B|1, T, 1, 1, rotary_ndims] to broadcast over the
        fused qkv view [B, T, kv_groups, heads_per_group, head_dim]. Cast once per forward, not once per layer."""
        if self.scaling is not None and self.scaling.type == "dynamic":
            cos, sin = self._dynamic(positions)
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        return cos.to(dtype)[:, :, None, None, :], sin.to(dtype)[:, :, None, None, :]

    def _dynamic(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one set of frequencies for the whole forward, as transformers picks it; chosen on the device
        seq_len = positions.max() + 1
        inv_freq = dynamic_inv_freq(self.rotary_ndims, self.base, self.scaling, seq_len)
        angles = positions[..., None].float() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        grown = seq_len > self.scaling.original_max_position_embeddings
        return torch.where(grown, angles.cos(), self.cos[positions]), torch.where(
            grown, angles.sin(), self.sin[positions]
        )


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
