"""Block-sparse layouts against plain-Python statements of DeepSpeed's definitions (unidirectional, as
GPT-NeoX builds them), hand-worked examples, and the dense token mask against a loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neox.config.attention import SparsityParams
from neox.model.sparsity import block_layout, layout_seed, mask_mod, token_mask, window_mask

# -- the definitions, one (row, column) at a time -----------------------------------------------------------


def random_columns(p: SparsityParams, heads: int, nb: int, seed: int, upto_row: bool) -> list[list[set[int]]]:
    """The documented draw: one [heads, nb, nb] uniform score table; each row takes the k best-scored blocks
    of its population, or all of it when smaller (ranked here by sorting in Python)."""
    table = torch.rand(heads, nb, nb, generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for scores in table:
        rows = []
        for r in range(nb):
            population = range(r + 1) if upto_row else range(nb)
            k = min(p.num_random_blocks, len(population))
            ranked = sorted(population, key=lambda c: -scores[r][c]) if k else []
            rows.append(set(ranked[:k]))
        out.append(rows)
    return out


def window_ids(nb: int, sizes: list[int]) -> list[int]:
    ids, w, left = [], 0, sizes[0]
    for _ in range(nb):
        if left == 0:
            w += 1
            left = sizes[min(w, len(sizes) - 1)]
        ids.append(w)
        left -= 1
    return ids


def global_set(p: SparsityParams, nb: int) -> set[int]:
    cols = set()
    ends = p.global_block_end_indices
    for i, start in enumerate(p.global_block_indices):
        stop = start + 1 if ends is None else ends[i]
        cols |= {c for c in range(start, stop) if c < nb and start < nb}
    return cols


def fixed_globals(p: SparsityParams, h: int, nb: int) -> set[int]:
    """DeepSpeed: pattern 0 takes the last num_global_blocks of every window, pattern j the group j before;
    a short last window takes the same offset, clipped so that its group ends at the last block."""
    nl, ng = p.num_local_blocks, p.num_global_blocks
    offset = nl - (1 + h % p.num_different_global_patterns) * ng
    cols = set()
    for start in range(0, nb, nl):
        first = start + offset if start + nl <= nb else max(0, min(start + offset, nb - ng))
        cols |= set(range(first, first + ng))
    return cols


def reference(kind: str, p: SparsityParams, heads: int, nb: int, seed: int) -> list[list[list[bool]]]:
    per_head = p.different_layout_per_head and kind != "local"
    layout_heads = heads if per_head else 1
    rnd = None
    if kind in ("sparse_variable", "bigbird"):
        rnd = random_columns(p, layout_heads, nb, seed, upto_row=kind == "bigbird")
    out = []
    for h in range(heads):
        lh = h if per_head else 0
        rows = []
        for r in range(nb):
            row = []
            for c in range(nb):
                if c > r:
                    row.append(False)
                    continue
                if kind == "local" or kind in ("bigbird", "bslongformer"):
                    ok = r - c <= p.num_sliding_window_blocks // 2
                    if kind == "bigbird":
                        ok = ok or r < p.num_global_blocks or c < p.num_global_blocks
                    if kind == "bslongformer":
                        g = global_set(p, nb)
                        ok = ok or r in g or c in g
                elif kind == "sparse_fixed":
                    ids = window_ids(nb, [p.num_local_blocks])
                    ok = ids[r] == ids[c] or c in fixed_globals(p, lh, nb)
                else:  # sparse_variable
                    ids = window_ids(nb, list(p.local_window_blocks))
                    ok = ids[r] == ids[c] or c in global_set(p, nb)
                if rnd is not None:
                    ok = ok or c in rnd[lh][r]
                row.append(ok)
            rows.append(row)
        out.append(rows)
    return out


CASES = [
    ("local", SparsityParams("local", num_sliding_window_blocks=4)),
    ("local", SparsityParams("local", num_sliding_window_blocks=1)),
    ("sparse_fixed", SparsityParams("sparse_fixed")),
    ("sparse_fixed", SparsityParams("sparse_fixed", num_local_blocks=3, num_global_blocks=1)),  # short last window
    ("sparse_fixed", SparsityParams("sparse_fixed", num_local_blocks=4, num_global_blocks=2)),
    (
        "sparse_fixed",
        SparsityParams(
            "sparse_fixed",
            num_local_blocks=6,
            num_global_blocks=2,
            different_layout_per_head=True,
            num_different_global_patterns=3,
        ),
    ),
    ("sparse_variable", SparsityParams("sparse_variable")),
    (
        "sparse_variable",
        SparsityParams(
            "sparse_variable", num_random_blocks=2, local_window_blocks=(1, 2, 3), global_block_indices=(0, 5, 20)
        ),
    ),
    (
        "sparse_variable",
        SparsityParams(
            "sparse_variable",
            num_random_blocks=1,
            different_layout_per_head=True,
            global_block_indices=(2, 7),
            global_block_end_indices=(4, 30),
        ),
    ),
    ("bigbird", SparsityParams("bigbird", num_random_blocks=1)),
    ("bigbird", SparsityParams("bigbird", num_random_blocks=3, num_sliding_window_blocks=5, num_global_blocks=2)),
    ("bigbird", SparsityParams("bigbird", num_random_blocks=2, different_layout_per_head=True)),
    ("bslongformer", SparsityParams("bslongformer")),
    ("bslongformer", SparsityParams("bslongformer", global_block_indices=(1, 6), global_block_end_indices=(3, 8))),
    ("bslongformer", SparsityParams("bslongformer", num_sliding_window_blocks=7, global_block_indices=(4,))),
]


@pytest.mark.parametrize("kind, p", CASES)
@pytest.mark.parametrize("nb", [1, 7, 12])
def test_layout_is_the_definition(kind, p, nb):
    heads = 4
    got = block_layout(kind, p, heads, nb, seed=11)
    assert got.dtype == torch.bool and got.shape == (heads, nb, nb)
    assert got.tolist() == reference(kind, p, heads, nb, 11)


@settings(max_examples=60, deadline=None)
@given(
    nb=st.integers(1, 14),
    nl=st.integers(1, 6),
    ng=st.integers(1, 3),
    patterns=st.integers(1, 3),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    starts=st.lists(st.integers(0, 15), min_size=1, max_size=3),
    rnd=st.integers(0, 16),
    seed=st.integers(0, 2**31),
)
def test_fixed_and_variable_match_the_definition_on_random_settings(nb, nl, ng, patterns, sizes, starts, rnd, seed):
    nl = nl * ng  # num_global_blocks divides num_local_blocks (checked at load)
    patterns = min(patterns, nl // ng)
    fixed = SparsityParams(
        "sparse_fixed",
        num_local_blocks=nl,
        num_global_blocks=ng,
        different_layout_per_head=patterns > 1,
        num_different_global_patterns=patterns,
    )
    assert block_layout("sparse_fixed", fixed, 3, nb, seed).tolist() == reference("sparse_fixed", fixed, 3, nb, seed)
    var = SparsityParams(
        "sparse_variable",
        num_random_blocks=rnd,
        local_window_blocks=tuple(sizes),
        global_block_indices=tuple(starts),
        global_block_end_indices=tuple(s + 1 + (s % 3) for s in starts) if seed % 2 else None,
        different_layout_per_head=bool(seed % 3),
    )
    assert block_layout("sparse_variable", var, 2, nb, seed).tolist() == reference("sparse_variable", var, 2, nb, seed)


# -- hand-worked examples -------------------------------------------------------------------------------------


def rows(*lines: str) -> list[list[bool]]:
    return [[ch == "x" for ch in line] for line in lines]


def test_fixed_by_hand():
    # windows of 4 blocks; pattern 0 = each window's last block as global column, pattern 1 = the one before
    got = block_layout("sparse_fixed", SparsityParams("sparse_fixed"), 1, 8, 0)[0]
    assert got.tolist() == rows(
        "x.......",
        "xx......",
        "xxx.....",
        "xxxx....",
        "...xx...",
        "...xxx..",
        "...xxxx.",
        "...xxxxx",
    )
    two = SparsityParams("sparse_fixed", different_layout_per_head=True, num_different_global_patterns=2)
    got = block_layout("sparse_fixed", two, 3, 8, 0)
    assert got[1].tolist() == rows(
        "x.......",
        "xx......",
        "xxx.....",
        "xxxx....",
        "..x.x...",
        "..x.xx..",
        "..x.xxx.",
        "..x.xxxx",
    )
    assert torch.equal(got[2], got[0])  # head 2 uses pattern 2 % 2 = 0


def test_fixed_short_last_window_by_hand():
    # 6 blocks, windows [0..3] and a short [4, 5]: its global block is clipped to the last block
    got = block_layout("sparse_fixed", SparsityParams("sparse_fixed"), 1, 6, 0)[0]
    assert got.tolist() == rows("x.....", "xx....", "xxx...", "xxxx..", "...xx.", "...xxx")


def test_local_bslongformer_bigbird_by_hand():
    # local with 4 window blocks: 4 // 2 = 2 blocks back
    got = block_layout("local", SparsityParams("local", num_sliding_window_blocks=4), 2, 5, 0)
    assert got[1].tolist() == rows("x....", "xx...", "xxx..", ".xxx.", "..xxx")
    # bslongformer: 3 window blocks = 1 back, global block 2 (row 2 sees all of its past, all later rows see it)
    got = block_layout("bslongformer", SparsityParams("bslongformer", global_block_indices=(2,)), 1, 6, 0)[0]
    assert got.tolist() == rows("x.....", "xx....", "xxx...", "..xx..", "..xxx.", "..x.xx")
    # bigbird without random blocks: window of 1 back and block 0 global
    got = block_layout("bigbird", SparsityParams("bigbird", num_random_blocks=0), 1, 5, 0)[0]
    assert got.tolist() == rows("x....", "xx...", "xxx..", "x.xx.", "x..xx")


def test_variable_windows_by_hand():
    # windows of 1, 2, then 3 repeated; global column 0
    got = block_layout("sparse_variable", SparsityParams("sparse_variable", local_window_blocks=(1, 2, 3)), 1, 7, 0)
    assert got[0].tolist() == rows("x......", "xx.....", "xxx....", "x..x...", "x..xx..", "x..xxx.", "x.....x")


# -- properties the attention paths rely on -------------------------------------------------------------------


@pytest.mark.parametrize("kind, p", CASES)
def test_every_row_sees_its_own_block_and_nothing_later(kind, p):
    layout = block_layout(kind, p, 2, 16, 5)
    assert layout.diagonal(dim1=1, dim2=2).all()  # no query row is fully masked (no NaN from softmax)
    assert not layout.triu(1).any()


def test_random_blocks_follow_the_layer_seed_only():
    p = SparsityParams("bigbird", num_random_blocks=2)
    a = block_layout("bigbird", p, 4, 32, layout_seed(3))
    assert torch.equal(a, block_layout("bigbird", p, 4, 32, layout_seed(3)))  # every rank, every resume
    assert not torch.equal(a, block_layout("bigbird", p, 4, 32, layout_seed(4)))  # another layer
    assert layout_seed(3) == layout_seed(3) and layout_seed(3) != layout_seed(4)
    per_head = block_layout(
        "bigbird", SparsityParams("bigbird", num_random_blocks=2, different_layout_per_head=True), 4, 32, 1
    )
    assert not torch.equal(per_head[0], per_head[1])


def test_token_mask_is_the_layout_in_tokens():
    p = SparsityParams("bslongformer", block=3, global_block_indices=(1,))
    layout = block_layout("bslongformer", p, 2, 5, 0)
    for t, window in ((15, None), (13, None), (15, 4)):  # 13: a partial last block
        got = token_mask(layout, 3, t, sliding_window=window)
        assert got.shape == (2, t, t)
        for h in range(2):
            for q in range(t):
                for k in range(t):
                    want = bool(layout[h, q // 3, k // 3]) and k <= q and (window is None or q - k <= window)
                    assert bool(got[h, q, k]) == want
    with pytest.raises(ValueError, match="more than the layout's 5 blocks"):
        token_mask(layout, 3, 16)


def test_window_mask_by_hand():
    # GPT-NeoX's rule: a query sees itself and the `width` keys before it
    assert window_mask(5, 2).tolist() == rows("x....", "xx...", "xxx..", ".xxx.", "..xxx")


def test_mask_mod_equals_token_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    p = SparsityParams("sparse_fixed", block=4, different_layout_per_head=True, num_different_global_patterns=2)
    layout = block_layout("sparse_fixed", p, 2, 6, 0)
    for window in (None, 5):
        got = flex.create_mask(mask_mod(layout, 4, window), 1, 2, 24, 24, device="cpu")
        assert torch.equal(got[0], token_mask(layout, 4, 24, window))
