"""bf16 matmuls on CPUs that have no bf16 arithmetic.

Without AVX512-BF16 or AMX (AMD Zen 2/3, Intel before Cooper Lake/Sapphire Rapids) PyTorch's bf16 GEMM takes an
emulated path: on a Zen 3 EPYC it measured 3-10x slower than fp32 for 8 to 256 rows (one thread,
50304x512 weight, 8 rows: 50 ms bf16 vs 16 ms below). Here the weight is converted to fp32 a block of rows at a
time, small enough to stay in cache, and multiplied in fp32. That is the arithmetic a native bf16 GEMM does
(bf16 x bf16 products are exact in fp32 and accumulate in fp32), the weight is still read as bf16, and the
result is rounded back to bf16. A single row (decoding at batch 1) is a GEMV, which the native path runs well,
so it is left to it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

BLOCK_BYTES = 2 << 20  # fp32 weight block per matmul: fits a core's share of L2/L3 on the CPUs this is for


@functools.lru_cache(maxsize=None)
def cpu_lacks_bf16() -> bool:
    """True on an x86 Linux CPU whose flags show neither avx512_bf16 nor amx_bf16. Elsewhere (other OSes,
    ARM) the answer is unknown and the native path is kept."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and "avx2" in flags and not {"avx512_bf16", "amx_bf16"} & set(flags)


@torch.library.custom_op("neox::bf16_linear_fp32_blocks", mutates_args=())
def bf16_linear_fp32_blocks(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 tensors on CPU, computed in fp32 over cache-sized weight blocks."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out_features = weight.shape[0]
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    step = max(64, BLOCK_BYTES // (4 * weight.shape[1]))
    for i in range(0, out_features, step):
        block = rows @ weight[i:i + step].float().t()
        if bias is not None:
            block += bias[i:i + step]
        out[:, i:i + step] = block
    return out.view(*x.shape[:-1], out_features)


@bf16_linear_fp32_blocks.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Bf16LinearOnCpu(TorchFunctionMode):
    """Routes F.linear calls with bf16 CPU weights and more than one row to bf16_linear_fp32_blocks.

    Used around inference forwards (generation, evaluation) when `cpu_lacks_bf16()`; the model code is unchanged.
    Works eagerly and inside torch.compile (the op is opaque to the compiler).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and weight.device.type == "cpu"
                    and x.dim() >= 2 and x.numel() > x.shape[-1]):
                return bf16_linear_fp32_blocks(x, weight, bias)
        return func(*args, **kwargs)


def fast_bf16_linears(model) -> TorchFunctionMode | None:
    """The mode to run `model`'s inference under, or None when it would change nothing (fp32, a GPU, or a CPU
    with native bf16)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.bfloat16 or not cpu_lacks_bf16():
        return None
    return Bf16LinearOnCpu()
