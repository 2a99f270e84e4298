"""Host memory: large CPU tensors on transparent huge pages, so that a step's temporaries cost few page faults.

glibc's malloc serves a block above its mmap threshold (128 KiB at first, up to 32 MiB) with pages fresh from
the kernel and unmaps it when freed, so each 4 KiB page costs a page fault when first written. A training step
allocates and frees the same large temporaries (activations, logits, gradients, the loss's chunks) every step,
and so faults them all in again every step: on a 2-core EPYC virtual machine, where a fault costs ~2 us, a
16 MiB temporary costs 4,096 faults (~8 ms, more than computing into it). PyTorch's CPU allocator can instead
align blocks of 2 MiB and more to 2 MiB and advise the kernel to back them with huge pages (its
THP_MEM_ALLOC_ENABLE switch): one fault per 2 MiB.

PyTorch reads the switch once, when it is loaded, so it must be in the environment before `import torch`:
`neox` sets it at start-up (and its torchrun workers inherit it); a program that imports neox as a library sets
it itself. Where the kernel's transparent huge pages are off (`never`), the advice is ignored.
"""

from __future__ import annotations

import os
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
_set_here: list[bool] = []  # whether use_huge_pages set THP_ENV (rather than the user's environment)


def use_huge_pages(environ: dict | None = None) -> bool:
    """Turn PyTorch's huge-page allocation on, unless the environment already says either way: for this
    process (if torch is not loaded yet) and the processes it starts, or, given `environ`, for a process about
    to be started with it. True where it is on."""
    if environ is None:
        if THP_ENV not in os.environ and "torch" not in sys.modules:
            os.environ[THP_ENV] = "1"
            _set_here.append(True)
        return os.environ.get(THP_ENV) == "1"
    environ.setdefault(THP_ENV, "1")
    return environ[THP_ENV] == "1"


def users_environment(environ: dict) -> dict:
    """`environ` as the user started the program, without the switch use_huge_pages added: what a process of
    another framework (the benchmark's reference engines) gets."""
    if _set_here:
        return {k: v for k, v in environ.items() if k != THP_ENV}
    return dict(environ)


def kernel_huge_pages(path: str = THP_SYSFS) -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never), None where it does not say."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    picked = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return picked[0] if picked else None
