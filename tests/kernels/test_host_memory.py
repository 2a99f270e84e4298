"""keep_freed_memory: glibc reuses a freed large block without page faults instead of unmapping it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neox.kernels import host_memory as hm

# In a fresh interpreter: malloc, fill and free a 64 MiB block a few times and print the minor page faults of
# each fill (torch is not involved: this is the C library's behaviour that the setting changes).
PROBE = r"""
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "keep":
    from neox.kernels.host_memory import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(4):
    p = libc.malloc(64 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.memset(p, 1, 64 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(*faults)
"""
PAGES = (64 << 20) // 4096


def _faults(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(x) for x in done.stdout.split()]


@pytest.mark.skipif(hm._glibc() is None, reason="keep_freed_memory changes glibc's malloc only")
def test_a_freed_block_is_reused_without_faults():
    default, kept = _faults("system"), _faults("keep")
    assert all(f > PAGES // 2 for f in default)  # glibc unmaps the block and faults it in anew every time
    assert kept[0] > PAGES // 2 and all(f < PAGES // 100 for f in kept[1:])  # first touch only


def test_it_changes_nothing_without_glibc(monkeypatch):
    hm.keep_freed_memory.cache_clear()
    monkeypatch.setattr(hm, "_glibc", lambda: None)
    try:
        assert hm.keep_freed_memory() is False
    finally:
        hm.keep_freed_memory.cache_clear()
