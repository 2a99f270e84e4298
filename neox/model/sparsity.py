"""Block-sparse attention layouts as GPT-NeoX builds them through DeepSpeed, always causal.

A layout is a bool tensor [H, nb, nb]: True where query block i may attend key block j. Layouts are causal at
block level (j <= i; DeepSpeed's unidirectional layouts can set blocks above the diagonal, which GPT-NeoX's
causal mask then hides completely, so they are dropped here), and within a visible block tokens are causal
by position (key <= query). `token_mask` expands a layout to the dense [H, T, T] reference.

Definitions (nb blocks, rows = query blocks; DeepSpeed's sparsity_config.py, unidirectional):
- local: row i sees blocks [i - num_sliding_window_blocks // 2, i].
- sparse_fixed: the blocks are cut into windows of num_local_blocks; a row sees the blocks of its own window up
  to itself, and every row at or after a window's global blocks sees them. The global blocks of a window are
  num_global_blocks consecutive blocks ending at the window's last block for pattern 0, shifted one group
  earlier per pattern; head h uses pattern h % num_different_global_patterns (different_layout_per_head).
  A short last window takes its global blocks at the same offset, clipped to the last blocks. Counts
  larger than nb (windows, random or global blocks) are clipped to nb.
- sparse_variable: windows of the sizes in local_window_blocks (the last size repeats to the end), global
  columns at global_block_indices (or the ranges [start, end) with global_block_end_indices), plus
  num_random_blocks random columns per row drawn from all nb blocks (those in the future are dropped).
- bigbird: a sliding window of num_sliding_window_blocks // 2 blocks back, the first num_global_blocks blocks
  as global rows and columns, plus num_random_blocks random columns per row drawn from blocks [0, i].
- bslongformer: the same sliding window, plus global rows and columns at global_block_indices (or ranges).
Without different_layout_per_head every head has head 0's layout.

Random blocks come from `torch.Generator().manual_seed(seed)`: one draw of `torch.rand(heads, nb, nb,
generator=g)` (heads = num_heads with different_layout_per_head, else 1) scores every block, and row i of
head h takes the k highest-scoring columns of its population (all nb blocks for sparse_variable, blocks
[0, i] for bigbird; k = min(num_random_blocks, nb); a row whose population is smaller takes all of it): a
uniformly random k-subset per row, as DeepSpeed's `random.sample`, in a few tensor ops.
The seed is a function of the layer alone (`layout_seed`), so every rank, every resume and every inference
run sees the same layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from neox.config.attention import SparsityParams, sparsity_params


def layout_seed(layer: int) -> int:
    """The random-block seed of one layer: a stable hash (not Python's salted `hash`), independent of the
    run's seed and of the parallel layout."""
    return int.from_bytes(hashlib.blake2b(f"neox-sparsity/{layer}".encode(), digest_size=8).digest(), "little")


def num_blocks(seq_length: int, params: SparsityParams) -> int:
    """Blocks of the layout a model builds: at seq_length, as DeepSpeed builds its master layout; shorter
    sequences use its top-left corner (`layout[:, :n, :n]`)."""
    return seq_length // params.block


def block_layout(
    kind: str, sparsity: SparsityParams | Mapping[str, Any], num_heads: int, num_blocks: int, seed: int
) -> torch.Tensor:
    """bool [num_heads, num_blocks, num_blocks] layout of one layer (see the module docstring).

    `sparsity` is the layer's SparsityParams or the model's checked sparsity_config mapping. Build it for all
    query heads of the model and slice the heads a tensor-parallel rank holds, so that the layout does not
    depend on the parallel layout.
    """
    p = sparsity if isinstance(sparsity, SparsityParams) else sparsity_params(kind, sparsity)
    if p.kind != kind:
        raise ValueError(f"sparsity parameters are for {p.kind}, not {kind}")
    layout_heads = num_heads if p.different_layout_per_head and kind != "local" else 1
    if kind == "sparse_fixed":
        # heads differ only by their global pattern, which repeats every num_different_global_patterns heads
        patterns = [_fixed(p, h, num_blocks) for h in range(min(p.num_different_global_patterns, layout_heads))]
        heads = torch.stack([patterns[h % len(patterns)] for h in range(layout_heads)])
    else:
        heads = _BUILDERS[kind](p, num_blocks).expand(layout_heads, num_blocks, num_blocks).clone()
    if kind in ("sparse_variable", "bigbird") and p.num_random_blocks:
        _random(heads, p.num_random_blocks, torch.Generator().manual_seed(seed), upto_row=kind == "bigbird")
    layout = heads.expand(num_heads, num_blocks, num_blocks) if layout_heads == 1 else heads
    causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
    return (layout & causal).contiguous()


def _window(nb: int, back: int) -> torch.Tensor:
    """Rows see the blocks from `back` before themselves up to themselves."""
    i = torch.arange(nb)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= back)


def _windows(nb: int, sizes: list[int]) -> torch.Tensor:
    """Consecutive windows of these sizes (the last repeats to the end), causal inside each."""
    owner = torch.empty(nb, dtype=torch.long)
    start, w = 0, 0
    while start < nb:
        size = sizes[min(w, len(sizes) - 1)]
        owner[start : start + size] = w
        start, w = start + size, w + 1
    return (owner[:, None] == owner[None, :]).tril()


def _random(heads: torch.Tensor, k: int, g: torch.Generator, upto_row: bool) -> None:
    h, nb, _ = heads.shape
    scores = torch.rand(h, nb, nb, generator=g)
    if upto_row:
        scores = scores.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), -1.0)
    # a row with fewer than k blocks in its past also picks future ones, which the causal cut drops
    top = scores.topk(min(k, nb), dim=-1).indices
    heads.scatter_(-1, top, True)


def _global_columns(layout: torch.Tensor, p: SparsityParams, rows_too: bool) -> None:
    nb = layout.shape[0]
    ends = p.global_block_end_indices or [s + 1 for s in p.global_block_indices]
    for start, end in zip(p.global_block_indices, ends):
        if start < nb:
            layout[:, start : min(end, nb)] = True
            if rows_too:
                layout[start : min(end, nb), :] = True


def _local(p: SparsityParams, nb: int) -> torch.Tensor:
    return _window(nb, p.num_sliding_window_blocks // 2)


def _fixed(p: SparsityParams, h: int, nb: int) -> torch.Tensor:
    nl, ng = p.num_local_blocks, p.num_global_blocks
    layout = _windows(nb, [nl])
    first = nl - (1 + h % p.num_different_global_patterns) * ng
    full_end = nb - nb % nl
    for col in range(first, full_end, nl):
        layout[:, col : col + ng] = True
    if full_end < nb:
        col = max(0, min(full_end + first, nb - ng))
        layout[:, col : col + ng] = True
    return layout


def _variable(p: SparsityParams, nb: int) -> torch.Tensor:
    layout = _windows(nb, list(p.local_window_blocks))
    _global_columns(layout, p, rows_too=False)
    return layout


def _bigbird(p: SparsityParams, nb: int) -> torch.Tensor:
    layout = _window(nb, p.num_sliding_window_blocks // 2)
    layout[: p.num_global_blocks, :] = True
    layout[:, : p.num_global_blocks] = True
    return layout


def _bslongformer(p: SparsityParams, nb: int) -> torch.Tensor:
    layout = _window(nb, p.num_sliding_window_blocks // 2)
    _global_columns(layout, p, rows_too=True)
    return layout


# the layout every head shares (sparse_fixed's per-pattern heads are built by _fixed itself)
_BUILDERS: dict[str, Callable[[SparsityParams, int], torch.Tensor]] = {
    "local": _local,
    "sparse_variable": _variable,
    "bigbird": _bigbird,
    "bslongformer": _bslongformer,
}


def window_mask(t: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [T, T] of Mistral-style sliding-window attention as GPT-NeoX's mask has it: query q sees keys
    q - width .. q (width + 1 tokens). Hugging Face's `sliding_window` counts the query too: HF = width + 1."""
    i = torch.arange(t, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= width)


def token_mask(layout: torch.Tensor, block: int, t: int, sliding_window: int | None = None) -> torch.Tensor:
    """The dense reference: bool [H, T, T], True where query token q may attend key token k: its blocks are
    visible in `layout`, k <= q, and (with a sliding window) q - k <= sliding_window. T may be any length up
    to nb * block (a partial last block is cut)."""
    nb = layout.shape[-1]
    if t > nb * block:
        raise ValueError(f"{t} tokens need more than the layout's {nb} blocks of {block}")
    idx = torch.arange(t, device=layout.device) // block
    mask = layout[:, idx][:, :, idx]
    pos = torch.arange(t, device=layout.device)
    causal = pos[:, None] >= pos[None, :]
    if sliding_window is not None:
        causal = causal & (pos[:, None] - pos[None, :] <= sliding_window)
    return mask & causal


def mask_mod(layout: torch.Tensor, block: int, sliding_window: int | None = None) -> Callable:
    """A FlexAttention `mask_mod(b, h, q, k)` equal to `token_mask(layout, block, T, sliding_window)`."""

    def allowed(b, h, q, k):
        ok = layout[h, q // block, k // block] & (q >= k)
        if sliding_window is not None:
            ok = ok & (q - k <= sliding_window)
        return ok

    return allowed
