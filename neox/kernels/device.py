"""Device and dtype names as users write them (configs, flags), resolved once for training and inference."""

from __future__ import annotations

import torch

from neox.errors import NeoxError

# short (config) and long (torch / Hugging Face) spellings of the floating-point dtypes neox runs in
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def torch_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """`name` (fp32/float32, bf16/bfloat16, fp16/float16, a torch.dtype or None) -> torch.dtype or None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise NeoxError(f"{what} {name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The long spelling ("bfloat16"), as torch and Hugging Face config files write it."""
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """`auto` -> cuda when present, else cpu; anything else is checked (a real device name, CUDA present).

    `what` names where the value came from (a flag or a config key) in the one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NeoxError(f"{what} {name!r}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NeoxError(f"{what} {name}: CUDA is not available here; use cpu (or auto)")
    return device
