"""The ways one layer's attention is computed; each equals `dense` (the reference) up to summation order.

q [B, H, T, D], k / v [B, H_kv, S, D] (H a multiple of H_kv: grouped-query heads share a kv head), output
[B, H, T, D]. Masks and biases come from neox.model.masks, evaluated only over the grid each path needs:

- dense: one [T, S] mask for SDPA. Memory O(H T S); the reference.
- chunked: query chunks of CHUNK rows, each with the key range it can see (causal, a sliding window's start,
  the first key of the chunk's earliest document) and its own mask tile, which is not kept for the backward
  pass: on CPU the flash kernel's backward gets the tile rebuilt, elsewhere (and for a T5 table's gradient)
  the chunk is recomputed. Memory O(H * CHUNK * S) beyond q, k, v-sized tensors.
- block_sparse: only the pairs of (query block, key block) some head's layout allows, scored per pair and
  normalised per query row with a softmax across pairs: memory and work O(pairs * block^2), plain PyTorch,
  forward and backward on any device.
- flex: FlexAttention with the same mask as a block mask and the same bias as a score_mod. Compiled it runs
  fused on CUDA (forward and backward) and CPU (forward only in torch 2.13); eager it is a reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from neox.model.attention_cpu import decoding_on_cpu, few_queries
from neox.model.masks import ForwardMask, LayerMask, allowed, bias, grid_indices, tile_scores_mask

# Query rows per chunk: a tile of 256 x S fp32 scores per head stays in cache-sized pieces for S of a few
# thousand, and the per-chunk overhead (a mask tile, one SDPA call) is small next to 256 rows of work.
CHUNK = 256


def dense(q, k, v, fm: ForwardMask, lm: LayerMask, rpe_bias=None, dropout: float = 0.0) -> torch.Tensor:
    """Reference: the whole [T, S] mask (with the bias folded in) handed to SDPA."""
    t, s = q.shape[2], k.shape[2]
    device = q.device
    mask = tile_scores_mask(
        fm, lm, q.shape[1], torch.arange(t, device=device), torch.arange(s, device=device), rpe_bias, q.dtype
    )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1]
    )


def key_range(fm: ForwardMask, lm: LayerMask, start: int, stop: int) -> tuple[int, int]:
    """Keys [lo, hi) that queries [start, stop) can see: causality ends them at the last query's slot and a
    sliding window starts them at the first query's window. A slot offset held in a tensor (static cache)
    gives no bound, so the whole cache is scanned under the mask."""
    if not isinstance(fm.q_offset, int):
        return 0, fm.num_keys
    hi = min(fm.num_keys, fm.q_offset + stop)
    lo = 0 if lm.window is None else max(0, fm.q_offset + start - lm.window)
    if fm.key_floor is not None:
        lo = max(lo, min(fm.key_floor[start:stop]))
    return lo, hi


def _chunk(q_c, k_c, v_c, fm, lm, rpe_bias, start, lo, dropout):
    device = q_c.device
    q_idx = torch.arange(start, start + q_c.shape[2], device=device)
    k_idx = torch.arange(lo, lo + k_c.shape[2], device=device)
    mask = tile_scores_mask(fm, lm, q_c.shape[1], q_idx, k_idx, rpe_bias, q_c.dtype)
    if decoding_on_cpu(q_c, k_c, dropout):
        return few_queries(q_c, k_c, v_c, mask)
    return F.scaled_dot_product_attention(
        q_c, k_c, v_c, attn_mask=mask, dropout_p=dropout, enable_gqa=q_c.shape[1] != k_c.shape[1]
    )


def _additive_tile(q_c, k_c, fm, lm, start, lo):
    device = q_c.device
    q_idx = torch.arange(start, start + q_c.shape[2], device=device)
    k_idx = torch.arange(lo, lo + k_c.shape[2], device=device)
    mask = tile_scores_mask(fm, lm, q_c.shape[1], q_idx, k_idx, None, q_c.dtype)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q_c.dtype, device=device).masked_fill(~mask, float("-inf"))
    return mask


def _chunks(fm: ForwardMask, lm: LayerMask, t: int, chunk: int):
    """(start, stop, lo, hi) of each query chunk and the keys it can see."""
    for start in range(0, t, chunk):
        stop = min(t, start + chunk)
        yield (start, stop, *key_range(fm, lm, start, stop))


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _CpuChunked(torch.autograd.Function):
    """All chunks through the CPU flash-attention kernel (the one SDPA calls), each chunk's mask tile built
    again for the backward kernel instead of being saved: what is kept is q, k, v, the output and its
    logsumexp, as for SDPA without a mask. Gradients go straight into one dq / dk / dv, not through a
    full-size gradient per chunk. For masks without learned parameters (ALiBi, documents, windows, layouts,
    cache padding); a T5 table's gradient needs the scores, so those chunks are recomputed through SDPA."""

    @staticmethod
    def forward(ctx, q, k, v, fm, lm, chunk):
        b, h, t, d = q.shape
        out, lse = torch.empty(b, h, t, d, dtype=q.dtype, device=q.device), None
        for start, stop, lo, hi in _chunks(fm, lm, t, chunk):
            k_c, v_c = k[:, :, lo:hi], v[:, :, lo:hi]
            mask = _additive_tile(q[:, :, start:stop], k_c, fm, lm, start, lo)
            o, logsumexp = _FLASH_CPU(q[:, :, start:stop], k_c, v_c, 0.0, False, attn_mask=mask)
            if lse is None:  # the kernel's own dtype for it (fp32 under low-precision inputs too)
                lse = torch.empty(b, h, t, dtype=logsumexp.dtype, device=q.device)
            out[:, :, start:stop], lse[:, :, start:stop] = o, logsumexp
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.where = (fm, lm, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        fm, lm, chunk = ctx.where
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start, stop, lo, hi in _chunks(fm, lm, q.shape[2], chunk):
            rows = slice(start, stop)
            q_c, k_c, v_c = q[:, :, rows], k[:, :, lo:hi], v[:, :, lo:hi]
            mask = _additive_tile(q_c, k_c, fm, lm, start, lo)
            g_q, g_k, g_v = _FLASH_CPU_BACKWARD(
                grad_out[:, :, rows], q_c, k_c, v_c, out[:, :, rows], lse[:, :, rows], 0.0, False, attn_mask=mask
            )
            dq[:, :, rows] = g_q
            dk[:, :, lo:hi] += g_k
            dv[:, :, lo:hi] += g_v
        return dq, dk, dv, None, None, None


def _window_parts(start: int, stop: int, window: int):
    """A chunk's keys under a sliding window alone, cut so that only small tiles need a mask:
    (lo, hi, causal, mask_rule) with mask_rule None (every key visible to every query of the chunk, or plain
    causal) or True (a [C, hi - lo] tile of k <= q, q - k <= window)."""
    c = stop - start
    # the chunk's own keys: the causal kernel, unless the window is shorter than the chunk
    parts = [(start, stop, window >= c - 1, window < c - 1)]
    full_lo = min(max(0, stop - 1 - window), start)  # keys every query of the chunk sees
    band_lo = max(0, start - window)
    if band_lo < full_lo:
        parts.append((band_lo, full_lo, False, True))  # the window's edge: a triangle of C x (<= C)
    if full_lo < start:
        parts.append((full_lo, start, False, False))
    return parts


def _window_tile(q_idx, lo, hi, window, dtype, device):
    k_idx = torch.arange(lo, hi, device=device)
    d = q_idx[:, None] - k_idx[None, :]
    ok = (d >= 0) & (d <= window)
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, float("-inf")), ok.any(-1)


class _CpuWindow(torch.autograd.Function):
    """Mistral's sliding window with nothing else to mask, on the CPU flash kernel: per query chunk its own
    keys (causal kernel), the keys all its queries see (no mask) and only the window's edge with a mask tile;
    the parts' outputs are merged by their logsumexps, and each part's backward runs with the merged output
    and logsumexp, which makes its gradients exactly its share. Less work than global causal attention and no
    [C, window] mask."""

    @staticmethod
    def forward(ctx, q, k, v, window, chunk):
        b, h, t, _ = q.shape
        out, lse = torch.empty_like(q), None
        for start in range(0, t, chunk):
            stop = min(t, start + chunk)
            q_c, q_idx = q[:, :, start:stop], torch.arange(start, stop, device=q.device)
            outs, lses = [], []
            for lo, hi, causal, masked in _window_parts(start, stop, window):
                mask, seen = _window_tile(q_idx, lo, hi, window, q.dtype, q.device) if masked else (None, None)
                o, l_part = _FLASH_CPU(q_c, k[:, :, lo:hi], v[:, :, lo:hi], 0.0, causal, attn_mask=mask)
                if seen is not None:  # a row with no key in this part: the kernel says 0, the merge needs -inf
                    l_part = l_part.masked_fill(~seen, float("-inf"))
                outs.append(o)
                lses.append(l_part)
            l_all = torch.logsumexp(torch.stack(lses), dim=0)
            merged = sum(o * torch.exp(l_part - l_all)[..., None].to(o.dtype) for o, l_part in zip(outs, lses))
            if lse is None:
                lse = torch.empty(b, h, t, dtype=l_all.dtype, device=q.device)
            out[:, :, start:stop], lse[:, :, start:stop] = merged, l_all
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.where = (window, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        window, chunk = ctx.where
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        t = q.shape[2]
        for start in range(0, t, chunk):
            stop = min(t, start + chunk)
            rows = slice(start, stop)
            q_idx = torch.arange(start, stop, device=q.device)
            for lo, hi, causal, masked in _window_parts(start, stop, window):
                mask = _window_tile(q_idx, lo, hi, window, q.dtype, q.device)[0] if masked else None
                g_q, g_k, g_v = _FLASH_CPU_BACKWARD(
                    grad_out[:, :, rows],
                    q[:, :, rows],
                    k[:, :, lo:hi],
                    v[:, :, lo:hi],
                    out[:, :, rows],
                    lse[:, :, rows],
                    0.0,
                    causal,
                    attn_mask=mask,
                )
                dq[:, :, rows] += g_q
                dk[:, :, lo:hi] += g_k
                dv[:, :, lo:hi] += g_v
        return dq, dk, dv, None, None


def _window_only(q, fm: ForwardMask, lm: LayerMask, rpe_bias, dropout) -> bool:
    plain = fm.segments is None and fm.key_valid is None and not fm.has_bias and rpe_bias is None
    no_cache = isinstance(fm.q_offset, int) and fm.q_offset == 0 and fm.num_keys == fm.num_queries
    return q.device.type == "cpu" and lm.window is not None and lm.layout is None and plain and no_cache and not dropout


def chunked(
    q, k, v, fm: ForwardMask, lm: LayerMask, rpe_bias=None, dropout: float = 0.0, chunk: int = CHUNK
) -> torch.Tensor:
    """Query-chunked SDPA with a mask tile per chunk (see the module docstring)."""
    t = q.shape[2]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, rpe_bias) if x is not None)
    # Kept for the backward pass, the chunks' mask tiles would add up to the dense mask. On CPU the flash kernel
    # is called with the tiles rebuilt for its backward; elsewhere (or with a T5 table to train, or dropout)
    # a chunk with a bias is recomputed in the backward pass, and a bias-free tile (one value per row, query
    # and key of the causal / window / document range) is kept.
    if _window_only(q, fm, lm, rpe_bias, dropout):
        return _CpuWindow.apply(q, k, v, lm.window, chunk)
    if grad and q.device.type == "cpu" and rpe_bias is None and not dropout:
        return _CpuChunked.apply(q, k, v, fm, lm, chunk)
    recompute = grad and fm.has_bias
    outs = []
    for start, stop, lo, hi in _chunks(fm, lm, t, chunk):
        args = (q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi], fm, lm, rpe_bias, start, lo, dropout)
        if recompute:
            outs.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            outs.append(_chunk(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class BlockPairs:
    """The (query block, key block) pairs of a layout cut to T queries, and which local heads see each.

    Built once per layout and sequence length (it reads the layout on the host) and reused by every layer
    and step with that layout.
    """

    def __init__(self, layout: torch.Tensor, block: int, t: int):
        nb = -(-t // block)
        corner = layout[:, :nb, :nb]
        qi, kj = corner.any(0).nonzero(as_tuple=True)  # row-major: pairs of one query block are adjacent
        self.block, self.num_blocks = block, nb
        self.q_block, self.k_block = qi, kj
        offsets = torch.arange(block, device=layout.device)
        self.q_idx = qi[:, None] * block + offsets  # [P, block] query numbers (past T: padding)
        self.k_idx = kj[:, None] * block + offsets


def block_sparse(
    q, k, v, fm: ForwardMask, lm: LayerMask, pairs: BlockPairs, rpe_bias=None, dropout: float = 0.0
) -> torch.Tensor:
    """Attention over the visible block pairs only, with a softmax across the pairs of each query row.

    Requires q_offset 0 and S = T (no KV cache): query and key blocks share one numbering.
    """
    bsz, heads, t, d = q.shape
    blk, nb = pairs.block, pairs.num_blocks
    pad = nb * blk - t
    group = heads // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb = q.view(bsz, heads, nb, blk, d)[:, :, pairs.q_block]  # [B, H, P, blk, D]
    kb = k.view(bsz, heads, nb, blk, d)[:, :, pairs.k_block]
    vb = v.view(bsz, heads, nb, blk, d)[:, :, pairs.k_block]
    # scores and softmax in fp32 (as SDPA's kernels accumulate), probabilities back in the input dtype
    scores = torch.matmul(qb, kb.transpose(-1, -2)).float() * d**-0.5  # [B, H, P, blk, blk]

    b, h, qi, ki = grid_indices(fm, heads, pairs.q_idx, pairs.k_idx)
    qi_c, ki_c = qi.clamp(max=t - 1), ki.clamp(max=t - 1)  # padding rows / keys read a real index, then drop
    ok = allowed(fm, lm, b, h, qi_c, ki_c) & (ki < t)
    extra = bias(fm, b, h, qi_c, ki_c, rpe_bias)
    if extra is not None:
        scores = scores + extra
    scores = scores.masked_fill(~ok, float("-inf"))

    # softmax over every key of a query row, whose keys are spread over the pairs of its query block
    row_max = scores.amax(dim=-1).detach()  # [B, H, P, blk]
    shape = (bsz, heads, nb, blk)
    block_max = torch.full(shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    index = pairs.q_block[None, None, :, None].expand_as(row_max)
    block_max = block_max.scatter_reduce(2, index, row_max, "amax")
    block_max = torch.where(torch.isfinite(block_max), block_max, torch.zeros_like(block_max))
    e = torch.exp(scores - block_max[:, :, pairs.q_block, :, None])
    denom = torch.zeros(shape, dtype=e.dtype, device=e.device).index_add(2, pairs.q_block, e.sum(-1))
    # a padding row past T can see nothing: 0 / tiny = 0 keeps NaN out of the backward pass
    p = e / denom.clamp(min=torch.finfo(e.dtype).tiny)[:, :, pairs.q_block, :, None]
    if dropout:
        p = F.dropout(p, dropout)
    out = torch.zeros(bsz, heads, nb, blk, d, dtype=q.dtype, device=q.device)
    out = out.index_add(2, pairs.q_block, torch.matmul(p.to(vb.dtype), vb))
    return out.view(bsz, heads, nb * blk, d)[:, :, :t]


def flex_mods(fm: ForwardMask, lm: LayerMask, rpe_bias=None):
    """(mask_mod, score_mod or None) for FlexAttention: the same `allowed` and `bias` with scalar indices."""

    # FlexAttention calls the mods with every real batch row; tensors without a batch axis (Bm = 1) take row 0
    def row(b):
        return b if fm.batch > 1 else b * 0

    def mask_mod(b, h, q, k):
        return allowed(fm, lm, row(b), h, q, k)

    if not fm.has_bias:
        return mask_mod, None

    def score_mod(score, b, h, q, k):
        return score + bias(fm, row(b), h, q, k, rpe_bias)

    return mask_mod, score_mod


def flex_block_mask(fm: ForwardMask, lm: LayerMask, heads: int, device, compiled: bool):
    """The FlexAttention BlockMask of this forward's mask for one layer pattern (build once, share)."""
    mask_mod, _ = flex_mods(fm, lm)
    per_head = lm.layout is not None
    return create_block_mask(
        mask_mod,
        fm.batch if fm.batch > 1 else None,
        heads if per_head else None,
        fm.num_queries,
        fm.num_keys,
        device=device,
        _compile=compiled,
    )


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, fm: ForwardMask, lm: LayerMask, block_mask, rpe_bias=None, compiled: bool = True):
    """FlexAttention with `block_mask` (from flex_block_mask) and the bias as a score_mod."""
    _, score_mod = flex_mods(fm, lm, rpe_bias)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
