"""bf16 matmuls on CPUs that have no bf16 arithmetic.

Without AVX512-BF16 or AMX (AMD Zen 2/3, Intel before Cooper Lake/Sapphire Rapids) PyTorch's bf16 GEMM takes an
emulated path, several times slower than fp32 (figures in docs/benchmarks.md, "Kernel measurements"). Here the
weight is converted to fp32 a block of rows at a
time, small enough to stay in cache, and multiplied in fp32. That is the arithmetic a native bf16 GEMM does
(bf16 x bf16 products are exact in fp32 and accumulate in fp32), the weight is still read as bf16, and the
result is rounded back to bf16 once. The backward pass works the same way, so training in bf16 (pure or
autocast) runs at about fp32 speed instead of many times slower. A single row (decoding at batch 1) is a
GEMV, which the native path runs well, so it is left to it.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

BLOCK_BYTES = 2 << 20  # fp32 weight block per matmul: fits a core's share of L2/L3 on the CPUs this is for


@functools.cache
def cpu_lacks_bf16() -> bool:
    """True on an x86 Linux CPU whose flags show neither avx512_bf16 nor amx_bf16. Elsewhere (other OSes,
    ARM) the answer is unknown and the native path is kept."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and "avx2" in flags and not {"avx512_bf16", "amx_bf16"} & set(flags)


def _block(features: int) -> int:
    return max(64, BLOCK_BYTES // (4 * features))


@torch.library.custom_op("neox::bf16_linear_fp32_blocks", mutates_args=())
def bf16_linear_fp32_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 tensors on CPU, computed in fp32 over cache-sized weight blocks."""
    with torch.autocast("cpu", enabled=False):  # the fp32 products must stay fp32 inside an autocast region
        rows = x.reshape(-1, x.shape[-1]).float()
        out_features = weight.shape[0]
        out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
        step = _block(weight.shape[1])
        for i in range(0, out_features, step):
            block = rows @ weight[i : i + step].float().t()
            if bias is not None:
                block += bias[i : i + step]
            out[:, i : i + step] = block
    return out.view(*x.shape[:-1], out_features)


@bf16_linear_fp32_blocks.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("neox::bf16_linear_fp32_blocks_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_w: bool, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of the op above, each accumulated in fp32 over weight-row blocks and
    rounded once; an unneeded one comes back empty."""
    with torch.autocast("cpu", enabled=False):
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1]).float() if need_w else None
        gx = torch.zeros(g.shape[0], weight.shape[1], dtype=torch.float32) if need_x else None
        gw = torch.empty_like(weight) if need_w else weight.new_empty(0)
        step = _block(weight.shape[1])
        for i in range(0, weight.shape[0], step):
            gb = g[:, i : i + step].float()
            if need_x:
                gx.addmm_(gb, weight[i : i + step].float())
            if need_w:
                gw[i : i + step] = gb.t() @ rows
        grad_x = gx.to(x.dtype).view(x.shape) if need_x else x.new_empty(0)
        grad_b = g.float().sum(0).to(grad.dtype) if need_b else grad.new_empty(0)
    return grad_x, gw, grad_b


@_backward_op.register_fake
def _(grad, x, weight, need_x, need_w, need_b):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape if need_w else 0),
        grad.new_empty(weight.shape[0] if need_b else 0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    need_b = need_b and ctx.has_bias
    gx, gw, gb = _backward_op(grad.contiguous(), x, weight, need_x, need_w, need_b)
    return gx if need_x else None, gw if need_w else None, gb if need_b else None


bf16_linear_fp32_blocks.register_autograd(_backward, setup_context=_setup_context)


class Bf16LinearOnCpu(TorchFunctionMode):
    """Routes F.linear calls that would run a bf16 GEMM on the CPU with more than one row to
    bf16_linear_fp32_blocks: bf16 weights and inputs, or fp32 ones inside a bf16 autocast region (cast to bf16
    here, as autocast would). DTensors (tensor parallelism) keep the native path.

    The model code is unchanged; the mode is entered around forwards (training steps, generation, evaluation)
    when `cpu_lacks_bf16()`. Works eagerly, under autograd and inside torch.compile (the op is opaque).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            routed = _route(*args, **kwargs)
            if routed is not None:
                return routed
        return func(*args, **kwargs)


# a function, not a staticmethod of the mode: dynamo (torch 2.13) fails building a guard on the latter
def _route(x, weight, bias=None):
    if (
        x.device.type != "cpu"
        or x.dim() < 2
        or x.numel() <= x.shape[-1]
        or isinstance(x, DTensor)
        or isinstance(weight, DTensor)
    ):
        return None
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        bias = bias.to(torch.bfloat16) if bias is not None else None
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return None
    return bf16_linear_fp32_blocks(x, weight, bias)


def bf16_matmul_mode(dtype: torch.dtype, device_type: str) -> TorchFunctionMode | None:
    """The mode for work computing in `dtype` on `device_type` (training steps, the MFU peak measurement), or
    None when it would change nothing (not bf16, not the CPU, or a CPU with bf16 arithmetic)."""
    if dtype != torch.bfloat16 or device_type != "cpu" or not cpu_lacks_bf16():
        return None
    return Bf16LinearOnCpu()


def fast_bf16_linears(model) -> TorchFunctionMode | None:
    """bf16_matmul_mode for `model`'s inference, judged by its parameters' dtype and device."""
    param = next(model.parameters(), None)
    return bf16_matmul_mode(param.dtype, param.device.type) if param is not None else None
