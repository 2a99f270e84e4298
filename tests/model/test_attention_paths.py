"""Every attention path against a plain softmax(QK^T / sqrt(d) + bias) V over a dense mask built here, for every
layer type with and without ALiBi, T5 bias, documents and a sliding window (fp32, forward and backward)."""

from __future__ import annotations

import math

import pytest
import torch

from neox.config.attention import SparsityParams
from neox.model import attention_paths as paths
from neox.model.masks import ForwardMask, LayerMask, rpe_by_distance
from neox.model.positional import ALiBi, RelativePositionBias, t5_relative_bucket
from neox.model.sparsity import block_layout, token_mask

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")

B, H, HKV, T, D, BLOCK = 2, 4, 2, 37, 8, 4  # T is not a multiple of the block or the chunk
NB = -(-T // BLOCK)
CHUNK = 8
SPARSITY = {
    "local": SparsityParams("local", block=BLOCK, num_sliding_window_blocks=4),
    "sparse_fixed": SparsityParams(
        "sparse_fixed", block=BLOCK, num_local_blocks=4, different_layout_per_head=True, num_different_global_patterns=2
    ),
    "sparse_variable": SparsityParams(
        "sparse_variable", block=BLOCK, num_random_blocks=1, local_window_blocks=(2, 3), global_block_indices=(0, 5)
    ),
    "bigbird": SparsityParams(
        "bigbird", block=BLOCK, different_layout_per_head=True, num_random_blocks=1, num_sliding_window_blocks=3
    ),
    "bslongformer": SparsityParams("bslongformer", block=BLOCK, num_sliding_window_blocks=3, global_block_indices=(1,)),
}
KINDS = ["global", *SPARSITY]
EXTRAS = ["none", "alibi", "rpe", "documents", "window"]
WINDOW = 6
RPE = (8, 20)


def layout_of(kind):
    return None if kind == "global" else block_layout(kind, SPARSITY[kind], H, NB, seed=3)


def segments():
    lengths = [[11, 20, 6], [30, 7]]
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


def case(kind, extra):
    """(ForwardMask, LayerMask, rpe module or None, the reference mask bool [B, H, T, T], bias [B, H, T, T])."""
    torch.manual_seed(0)
    layout = layout_of(kind)
    window = WINDOW if extra == "window" else None
    per_row = extra in ("documents", "alibi", "rpe")
    fm = ForwardMask(q_offset=0, num_queries=T, num_keys=T, batch=B if per_row else 1)
    lm = LayerMask(window=window, layout=layout, block=BLOCK if layout is not None else 0)
    # reference mask: the layouts' own token mask, or causal (with the window) built here
    if layout is not None:
        mask = token_mask(layout, BLOCK, T, sliding_window=window)[None].expand(B, H, T, T)
    else:
        i = torch.arange(T)
        mask = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] <= window) if window else True)
        mask = mask.expand(B, H, T, T)
    ref_bias = torch.zeros(B, H, T, T)
    # positions restart per document on row 0 and run on row 1, so distances are per-row
    pos = torch.stack([torch.cat([torch.arange(n) for n in (11, 20, 6)]), torch.arange(T)])
    rpe = None
    if extra == "documents":
        seg = segments()
        fm.set_segments(seg)
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    if extra in ("alibi", "rpe"):
        fm.q_pos = fm.k_pos = pos
    if extra == "alibi":
        fm.q_pos = fm.k_pos = pos.float()
        fm.alibi_slopes = ALiBi(H).slopes
        ref_bias = ALiBi(H)(pos, pos)
    if extra == "rpe":
        fm.rpe = RPE
        rpe = RelativePositionBias(*RPE, H, D)
        torch.nn.init.normal_(rpe.relative_attention_bias.weight)
    return fm, lm, rpe, mask, ref_bias


def reference(q, k, v, mask, ref_bias):
    k = k.repeat_interleave(H // HKV, dim=1)
    v = v.repeat_interleave(H // HKV, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + ref_bias
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def rpe_reference_bias(rpe, pos):
    # the T5 module's own [B, H, T, S] bias from its bucket function, independent of masks.bias
    return rpe(t5_relative_bucket(pos[:, None, :] - pos[:, :, None], *RPE))


def tensors():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, HKV, T, D, generator=g, requires_grad=True)
    v = torch.randn(B, HKV, T, D, generator=g, requires_grad=True)
    return q, k, v


def run_path(name, q, k, v, fm, lm, table):
    if name == "dense":
        return paths.dense(q, k, v, fm, lm, table)
    if name == "chunked":
        return paths.chunked(q, k, v, fm, lm, table, chunk=CHUNK)
    if name == "block_sparse":
        return paths.block_sparse(q, k, v, fm, lm, paths.BlockPairs(lm.layout, lm.block, T), table)
    # FlexAttention has no backward pass on CPU: it refuses inputs that require grad
    q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = paths.flex_block_mask(fm, lm, H, q.device, compiled=False)
    return paths.flex(q, k, v, fm, lm, block_mask, None if table is None else table.detach(), compiled=False)


def grads(out, inputs, seed=2):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("kind", KINDS)
def test_paths_equal_the_dense_reference(kind, extra):
    fm, lm, rpe, mask, ref_bias = case(kind, extra)
    q, k, v = tensors()
    if rpe is not None:
        ref_bias = rpe_reference_bias(rpe, fm.q_pos)
    expect = reference(q, k, v, mask, ref_bias)
    weights = [q, k, v] + ([rpe.relative_attention_bias.weight] if rpe is not None else [])
    expect_grads = grads(expect, weights)
    names = ["dense", "chunked", "flex"] + (["block_sparse"] if lm.layout is not None else [])
    for name in names:
        table = None
        if rpe is not None:
            table = rpe_by_distance(fm, rpe(torch.arange(RPE[0])[None, :, None])[0, :, :, 0])
        out = run_path(name, q, k, v, fm, lm, table)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        if name == "flex":
            continue
        for got, want in zip(grads(out, weights), expect_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name} grad: {m}")
