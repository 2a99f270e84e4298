"""RNG streams a checkpoint carries: Python, NumPy, torch's CPU generator and this rank's GPU generator.

Each rank saves its own streams (`all_rng_states` gathers them in rank order) so that every rank resumes its
own dropout stream; the GPU stream is the current device's only, so a checkpoint restores on any GPU count.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    """This process's RNG streams: Python, NumPy, torch's CPU generator and, when CUDA is in use, the
    generator of this rank's own GPU (the current device) only, so a checkpoint restores on any GPU count."""
    name, keys, *rest = np.random.get_state()
    # plain ints rather than an ndarray, so trainer_state.pt loads with torch.load(weights_only=True)
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), *rest), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s streams; the saved GPU stream goes to the current device whatever the device
    count (none: only the CPU streams are restored). Checkpoints written before the GPU state was per rank hold
    every GPU's state in a list: the current device's entry is taken when there is one."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


def all_rng_states() -> list[dict]:
    """Every rank's RNG state (rank order), so each rank resumes its own dropout stream."""
    mine = rng_state()
    if not dist.is_initialized():
        return [mine]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


# what an older trainer_state.pt (NumPy's RNG keys saved as an ndarray) needs beyond weights_only's own types
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # NumPy 2 renamed it
LEGACY_NUMPY_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
