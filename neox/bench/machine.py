"""What a benchmark ran on: CPU model and flags, GPU, versions, and the load while it ran."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

# /proc/cpuinfo flags that decide which matmul and attention kernels a CPU gets
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")


def load() -> list[float]:
    """1-, 5- and 15-minute load averages (what other processes are doing to the measurement)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    info = {
        "model": model,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "relevant_flags": [f for f in RELEVANT_FLAGS if f in flags],
        "flags": flags,
    }
    try:  # lscpu adds caches and sockets; absent on some systems
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["lscpu"] = {
            k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v.strip()
        }
        info["lscpu"].pop("Flags", None)  # already in "flags"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("neox", "torch", "transformers", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def gpu_info() -> list[dict]:
    """The CUDA devices torch sees (torch is imported here, so call this in a child, not in `neox bench`)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        {
            "name": torch.cuda.get_device_name(i),
            "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
            "capability": list(torch.cuda.get_device_capability(i)),
            "cuda": torch.version.cuda,
        }
        for i in range(torch.cuda.device_count())
    ]
