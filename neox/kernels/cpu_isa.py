"""Which matrix units PyTorch's CPU kernels can use on this machine, for kernel choices made per machine.

SDPA's CPU flash kernel multiplies its bf16/fp16 tiles with oneDNN's small-GEMM kernels when the CPU has AMX
for that dtype (amx_bf16 for bf16, amx_fp16 for fp16) and otherwise with a much slower generic path. Which of
neox's own CPU attention kernels pays therefore depends on the machine (figures in neox.model.attention_cpu).
ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) below the AMX levels takes AMX away from oneDNN while
torch's CPU probe still reports it, so the cap is read too.
"""

from __future__ import annotations

import os

import torch


def _onednn_cap_allows_amx() -> bool:
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return cap == "ALL" or "AMX" in cap


def probe_amx(dtype: torch.dtype) -> bool:
    """Whether oneDNN's GEMMs can use this CPU's AMX tiles for `dtype` (bf16 or fp16), asked now."""
    if dtype == torch.bfloat16:
        has = torch.cpu._is_amx_tile_supported()
    elif dtype == torch.float16:
        has = torch.cpu._is_amx_fp16_supported()
    else:
        return False
    return bool(has) and _onednn_cap_allows_amx()


# asked once, at import (as oneDNN reads its cap once): a compiled region reads the answer as a constant
_AMX = {dtype: probe_amx(dtype) for dtype in (torch.bfloat16, torch.float16)}


def onednn_has_amx(dtype: torch.dtype) -> bool:
    """Whether oneDNN's GEMMs use AMX tiles for `dtype` in this process."""
    return _AMX.get(dtype, False)
