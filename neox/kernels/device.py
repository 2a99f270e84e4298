"""Device and dtype names as users write them (configs, flags), resolved once for training and inference."""

from __future__ import annotations

import os

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


def launched_local_rank() -> int | None:
    """This process's index on its machine when torchrun started several processes (LOCAL_RANK with
    WORLD_SIZE > 1); None for a single process."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", 0))


def rank_cuda_device(local_rank: int, what: str = "--device") -> torch.device:
    """The GPU of local rank `local_rank`: cuda:LOCAL_RANK, or cuda:0 when each process sees one GPU only
    (a launcher that sets CUDA_VISIBLE_DEVICES per process)."""
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise NeoxError(
            f"{what}: local rank {local_rank} needs a GPU of its own but this machine shows {count}; "
            f"start at most {count} processes per node"
        )
    return torch.device("cuda", local_rank)


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """`auto` -> cuda when present, else cpu; anything else is checked (a real device name, CUDA present).

    Under torchrun with several processes a CUDA device is always the rank's own GPU (`rank_cuda_device`):
    `cuda` and `cuda:N` both mean "the GPU of this LOCAL_RANK", so `cuda:0` does not put every rank on GPU 0.
    `what` names where the value came from (a flag or a config key) in the one-line error."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise NeoxError(f"{what} {name!r}: not a device; use cpu, cuda, cuda:N or auto") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise NeoxError(f"{what} {name}: CUDA is not available here; use cpu (or auto)")
    local_rank = launched_local_rank()
    if device.type == "cuda" and local_rank is not None:
        return rank_cuda_device(local_rank, what)
    return device
