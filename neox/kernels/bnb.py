"""bitsandbytes, imported once on first use and never with network access.

bitsandbytes is optional (8-bit optimizer state, 4-bit matmuls). Its import is not free: on a CPU with
avx512_bf16 it asks the `kernels` package (installed with transformers) to download a 4-bit GEMM from the
Hugging Face Hub, which is a DNS lookup at best and a hang on an offline node at worst. With `kernels`
hidden from that import it keeps the kernels bundled in its wheel (and says so in a warning we silence), so
neox imports it that way and never from module level, which also keeps its seconds of import time out of
every command that does not use it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys


@contextlib.contextmanager
def _without(module: str):
    """`import module` fails inside the block (a None entry in sys.modules); the entry is restored after."""
    missing = object()
    before = sys.modules.get(module, missing)
    sys.modules[module] = None
    try:
        yield
    finally:
        if before is missing:
            sys.modules.pop(module, None)
        else:
            sys.modules[module] = before


@functools.cache
def load_bitsandbytes():
    """The bitsandbytes module, or None when it is not installed or its import fails."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _without("kernels"):
            return importlib.import_module("bitsandbytes")
    except Exception:  # not installed, or a wheel whose native library does not load on this machine
        return None
    finally:
        quiet.setLevel(level)
