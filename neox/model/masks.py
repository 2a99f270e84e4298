"""Which keys a query may see and what bias its score gets, as functions of broadcastable index tensors.

Every attention path evaluates these same two functions: the dense reference over the whole [T, S] grid,
the query-chunked path over one [C, K] tile at a time, the block-sparse path over the pairs of visible
blocks, and FlexAttention as its mask_mod / score_mod (called with scalar indices). So a mask or a bias is
defined once, and memory is whatever grid the path asks for, never a [B, H, T, S] tensor unless it asks.

Indices: `b` batch row, `h` local query head, `q` query number within this forward (0..T-1), `k` key slot
(0..S-1). A query's slot is q_offset + q (the KV cache length), and causality is by slot, never by position
value; ALiBi / T5 distances use the position values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neox.model.positional import t5_relative_bucket


@dataclass
class ForwardMask:
    """What one forward pass's queries may see, shared by all its layers.

    segments: [Bm, T] document ids (reset_attention_mask; no cache; set with set_segments). key_valid: [Bm, S] False on KV-cache
    padding slots. q_pos / k_pos: [Bm, T] / [Bm, S] position values, set when a bias needs them (fp32 for
    ALiBi, integers for T5 buckets). Bm is the batch
    size where some tensor differs per row, else 1 (so masks broadcast over the batch).
    alibi_slopes: [H_local] fp32, or None. rpe: (num_buckets, max_distance) of T5 buckets, or None.
    """

    q_offset: int | torch.Tensor
    num_queries: int
    num_keys: int
    batch: int
    segments: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    rpe: tuple[int, int] | None = None
    key_floor: list[int] | None = None

    def set_segments(self, segments: torch.Tensor) -> None:
        """Documents [Bm, T]; also notes, per query, the first key of its document in any row (`key_floor`), so
        the chunked path skips the keys of earlier documents. Read on the host once per forward, so only on CPU
        and not under torch.compile (elsewhere the chunks mask those keys instead of skipping them)."""
        self.segments = segments
        if segments.device.type != "cpu" or torch.compiler.is_compiling():
            return
        t = segments.shape[1]
        _, ids = torch.unique(segments, return_inverse=True)
        slots = torch.arange(t, device=segments.device).expand_as(ids)
        first = torch.full((ids.shape[0], int(ids.max()) + 1), t, dtype=torch.long, device=segments.device)
        first = first.scatter_reduce(1, ids, slots, "amin")
        self.key_floor = first.gather(1, ids).amin(0).tolist()

    @property
    def has_bias(self) -> bool:
        return self.alibi_slopes is not None or self.rpe is not None


@dataclass
class LayerMask:
    """What one layer adds: a sliding window (query q sees keys q - window .. q) and/or a block layout
    bool [H_local, nb, nb] of `block`-token blocks (True = query block may see key block)."""

    window: int | None = None
    layout: torch.Tensor | None = None
    block: int = 0

    @property
    def trivial(self) -> bool:
        return self.window is None and self.layout is None


def allowed(fm: ForwardMask, lm: LayerMask, b, h, q, k) -> torch.Tensor:
    """bool, broadcast over the shapes of b, h, q, k: may query q (of row b, head h) attend to key slot k."""
    qs = q + fm.q_offset
    ok = k <= qs
    if lm.window is not None:
        ok = ok & (qs - k <= lm.window)
    if lm.layout is not None:
        ok = ok & lm.layout[h, qs // lm.block, k // lm.block]
    if fm.segments is not None:
        ok = ok & (fm.segments[b, q] == fm.segments[b, k])
    if fm.key_valid is not None:
        # a padding query would have no key at all; letting it see itself keeps softmax finite
        ok = (ok & fm.key_valid[b, k]) | (k == qs)
    return ok


def rpe_by_distance(fm: ForwardMask, rpe_table: torch.Tensor) -> torch.Tensor:
    """A layer's T5 bias per (head, distance n = query pos - key pos, 0..max_distance): its table [H_local,
    buckets] (already scaled) at each distance's bucket. Buckets saturate at max_distance and every key in the
    future is distance 0, so n clamped to that range finds every bucket: one lookup per score, no logarithm."""
    num_buckets, max_distance = fm.rpe
    n = torch.arange(max_distance + 1, device=rpe_table.device)
    return rpe_table[:, t5_relative_bucket(-n, num_buckets, max_distance)]


def bias(fm: ForwardMask, b, h, q, k, rpe_bias: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 score bias broadcast over b, h, q, k, or None. ALiBi: -slope_h * (query pos - key pos).
    T5: the layer's bias at bucket(key pos - query pos), from rpe_bias = rpe_by_distance(fm, its table)."""
    if not fm.has_bias:
        return None
    if fm.alibi_slopes is not None:
        # positions held as fp32 for ALiBi (exact below 2^24): no integer-to-float pass per score
        return fm.alibi_slopes[h] * (fm.k_pos[b, k] - fm.q_pos[b, q])
    distance = fm.q_pos[b, q] - fm.k_pos[b, k]
    return rpe_bias[h, distance.clamp(0, fm.rpe[1])].float()


def grid_indices(fm: ForwardMask, heads: int, q_idx: torch.Tensor, k_idx: torch.Tensor):
    """(b, h, q, k) index tensors for tiles of queries q_idx [..., C] against keys k_idx [..., K] (same leading
    dims), broadcasting to [Bm, heads, ..., C, K]."""
    lead = q_idx.dim() - 1
    device = q_idx.device
    b = torch.arange(fm.batch, device=device).view(-1, *([1] * (lead + 3)))
    h = torch.arange(heads, device=device).view(1, -1, *([1] * (lead + 2)))
    return b, h, q_idx[None, None, ..., :, None], k_idx[None, None, ..., None, :]


def tile_scores_mask(
    fm: ForwardMask, lm: LayerMask, heads: int, q_idx, k_idx, rpe_table, dtype: torch.dtype
) -> torch.Tensor:
    """The attention mask of one tile for SDPA: bool [Bm, heads|1, ..., C, K] where there is no bias, else
    the additive float (bias where allowed, -inf where not) in `dtype`."""
    b, h, q, k = grid_indices(fm, heads, q_idx, k_idx)
    ok = allowed(fm, lm, b, h, q, k)
    extra = bias(fm, b, h, q, k, rpe_table)
    if extra is None:
        return ok
    return extra.masked_fill(~ok, float("-inf")).to(dtype)
