"""The bf16-on-CPU linear: same arithmetic as a native bf16 GEMM (fp32 products and sums), any shape."""

import pytest
import torch
import torch.nn.functional as F

from neox.infer.kernels import Bf16LinearOnCpu, bf16_linear_fp32_blocks, fast_bf16_linears


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)])
def test_blocks_equal_an_fp32_product_rounded_once(bias, shape):
    torch.manual_seed(0)
    # more output features than one block holds at this width, so several blocks and a ragged last one
    w = torch.randn(9000, 64).to(torch.bfloat16)
    b = torch.randn(9000).to(torch.bfloat16) if bias else None
    x = torch.randn(*shape).to(torch.bfloat16)
    want = F.linear(x.double(), w.double(), b.double() if bias else None).to(torch.bfloat16)
    got = bf16_linear_fp32_blocks(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 9000)
    # fp32 sums of 64 products may round differently from float64 in the last bf16 bit, rarely
    mismatch = (got != want).float().mean().item()
    assert mismatch < 0.01
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.01)


def test_mode_routes_only_bf16_matmuls_with_several_rows(monkeypatch):
    from neox.infer import kernels

    calls = []
    real = kernels.bf16_linear_fp32_blocks
    monkeypatch.setattr(kernels, "bf16_linear_fp32_blocks", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    with torch.no_grad(), Bf16LinearOnCpu():
        routed = lin(x)
        lin(torch.randn(1, 1, 16).to(torch.bfloat16))  # one row: the native GEMV
        torch.nn.Linear(16, 8)(torch.randn(4, 16))  # fp32: untouched
    assert calls == [(2, 3, 16)]
    assert torch.equal(routed, real(x, lin.weight, lin.bias))


def test_mode_is_only_used_for_bf16_cpu_models():
    assert fast_bf16_linears(torch.nn.Linear(4, 4)) is None  # fp32: nothing to do
