"""The bf16-on-CPU linear: same arithmetic as a native bf16 GEMM (fp32 products and sums), any shape."""

import pytest
import torch
import torch.nn.functional as F

from neox.kernels.bf16_cpu import Bf16LinearOnCpu, bf16_linear_fp32_blocks, fast_bf16_linears


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
    from neox.kernels import bf16_cpu as kernels

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


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_fp32_products_rounded_once(bias):
    torch.manual_seed(0)
    w = (torch.randn(5000, 48) * 0.1).to(torch.bfloat16).requires_grad_()
    b = torch.randn(5000).to(torch.bfloat16).requires_grad_() if bias else None
    x = torch.randn(2, 7, 48).to(torch.bfloat16).requires_grad_()
    g = torch.randn(2, 7, 5000).to(torch.bfloat16)
    bf16_linear_fp32_blocks(x, w, b).backward(g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    F.linear(xd, wd, bd).backward(g.double())
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad)) + (((b.grad, bd.grad),) if bias else ()):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), atol=0.02, rtol=0.01)


def test_autocast_region_is_routed_and_gives_fp32_master_gradients(monkeypatch):
    from neox.kernels import bf16_cpu as kernels

    calls = []
    real = kernels.bf16_linear_fp32_blocks
    monkeypatch.setattr(kernels, "bf16_linear_fp32_blocks", lambda *a: calls.append(a[1].dtype) or real(*a))
    lin = torch.nn.Linear(32, 16)  # fp32 master weights
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), Bf16LinearOnCpu():
        y = lin(x)
    assert calls == [torch.bfloat16] and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32
    ref = torch.nn.Linear(32, 16)
    ref.load_state_dict(lin.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x).float().sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=0.05, rtol=0.02)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, atol=0.05, rtol=0.02)
