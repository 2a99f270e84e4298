"""The CPU matmul attention (neox.model.attention_cpu) against SDPA: decode steps and causal self-attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neox.model import attention_cpu

H, HKV, D = 4, 2, 8


@pytest.fixture
def without_amx(monkeypatch):
    """These kernels are for CPUs whose oneDNN has no AMX for the dtype; test them on any CPU."""
    monkeypatch.setattr(attention_cpu, "onednn_has_amx", lambda dtype: False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_decode_step_matmuls_equal_sdpa(dtype, mask_kind, without_amx):
    # a CPU decode step in bf16/fp16 (few query rows, no gradient) skips the flash kernel: same result as SDPA
    # computed in fp32, with grouped-query heads, and 0 for a row that may see no key (as the flash kernel)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, H, 2, D, generator=g).to(dtype)
    k, v = (torch.randn(3, HKV, 11, D, generator=g).to(dtype) for _ in range(2))
    mask = None
    if mask_kind != "none":
        mask = torch.rand(3, 1, 2, 11, generator=g) > 0.3
        mask[1, :, 0] = False  # a row with no key allowed
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")).add_(torch.randn(mask.shape, generator=g))
    assert attention_cpu.decoding_on_cpu(q, k, 0.0) and not attention_cpu.decoding_on_cpu(q.float(), k, 0.0)
    ours = attention_cpu.few_queries(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    if mask_kind != "none":
        ref[1, :, 0] = 0.0  # the fp32 math kernel gives NaN there, the CPU flash kernel 0
    assert ours.dtype == dtype and ours.shape == q.shape
    torch.testing.assert_close(ours.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)
    assert torch.isfinite(ours).all()


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("t", [5, 128, 300])  # just above the decode rows, one block, blocks with a short last
def test_causal_blocks_match_sdpa_forward_and_backward(t, without_amx):
    # against float64 SDPA: errors no larger than SDPA's own bf16 flash kernel makes (bf16 rounding of the
    # inputs and outputs is what both share)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, t, 16, generator=g) for _ in range(4))
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    out_ref = F.scaled_dot_product_attention(*ref, is_causal=True)
    out_ref.backward(grad.double())

    def run(fn):
        xs = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.backward(grad.bfloat16())
        return [out, *(x.grad for x in xs)]

    assert attention_cpu.causal_on_cpu(q.bfloat16(), k.bfloat16(), 0.0)
    ours = run(attention_cpu.CausalBlocks.apply)
    flash = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True))
    for o, f, r in zip(ours, flash, [out_ref.detach(), *(x.grad for x in ref)]):
        assert o.dtype == torch.bfloat16
        assert _rel(o, r) <= 1.3 * _rel(f, r) + 1e-3, (_rel(o, r), _rel(f, r))


def test_causal_blocks_only_where_they_apply(without_amx):
    q = torch.randn(1, 2, 16, 8, dtype=torch.bfloat16)
    assert attention_cpu.causal_on_cpu(q, q, 0.0)
    assert not attention_cpu.causal_on_cpu(q.float(), q.float(), 0.0)  # fp32 SDPA is as fast
    assert not attention_cpu.causal_on_cpu(q, q, 0.1)  # attention dropout: SDPA
    assert not attention_cpu.causal_on_cpu(q, q[:, :1], 0.0)  # grouped-query heads: SDPA
    assert not attention_cpu.causal_on_cpu(q[:, :, :3], q[:, :, :3], 0.0)  # a decode step's few rows


def test_a_cpu_with_amx_for_the_dtype_keeps_sdpa(monkeypatch):
    # there SDPA's flash kernel multiplies its tiles with AMX and is the faster one (module docstring)
    monkeypatch.setattr(attention_cpu, "onednn_has_amx", lambda dtype: dtype == torch.bfloat16)
    q = torch.randn(1, 2, 16, 8, dtype=torch.bfloat16)
    assert not attention_cpu.causal_on_cpu(q, q, 0.0)
    assert not attention_cpu.decoding_on_cpu(q[:, :, :1], q, 0.0)
    assert attention_cpu.causal_on_cpu(q.half(), q.half(), 0.0)  # no AMX for fp16 here
