"""Checkpoint manifests: the size and sha256 of every file of a checkpoint, written durably, checked on load.

`write` runs once every file of a checkpoint's `.tmp` directory is in place and fsynced; `verified` tells what
is wrong with a checkpoint against its `manifest.json` (None: nothing). Hashing reads 8 MiB at a time and the
files are split over the ranks, so checking a checkpoint costs about a second per GB per rank. Checkpoints
written before manifests existed have none: they are reported as unverified, not as damaged.

The small rank-aware helpers (`rank`, `gather`, `note`) live here too: both the manifest and the checkpoint
writer need them, and they work without a process group (one process: rank 0, a list of one).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
CHUNK = 8 << 20


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (collective when a process group exists)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def note(text: str) -> None:
    """A line about checkpoints for the user: rank 0, on stderr, so a quiet trainer still shows it."""
    if rank() == 0:
        print(text, file=sys.stderr, flush=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` or what it held before, whatever moment a crash comes at (write, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def describe(root: Path, names) -> dict:
    """{name: {"size", "sha256"}} of the files `names` in `root`."""
    return {n: {"size": (root / n).stat().st_size, "sha256": sha256(root / n)} for n in names}


def write(ckpt: Path, files: dict) -> None:
    """Write `ckpt`'s manifest: `files` (already described, e.g. by the ranks that wrote them) plus every other
    plain file in the directory, described here."""
    rest = sorted(p.name for p in ckpt.iterdir() if p.is_file() and p.name not in files)
    files = dict(sorted({**files, **describe(ckpt, rest)}.items()))
    write_atomic(ckpt / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1) + "\n")


_VERIFIED: dict = {}


def verified(ckpt: Path, announce: bool) -> str | None:
    """What is wrong with `ckpt` against its manifest (None: nothing), computed once per process (collective
    under a process group the first time)."""
    manifest = ckpt / MANIFEST
    try:
        key = (str(ckpt.resolve()), manifest.stat().st_mtime_ns)
    except OSError:
        key = (str(ckpt.resolve()), None)
    if key not in _VERIFIED:
        _VERIFIED[key] = _verify(ckpt, announce)
    return _VERIFIED[key]


def _verify(ckpt: Path, announce: bool) -> str | None:
    """Check every file of the manifest (present, size, sha256); rank r hashes files r, r + world, ..."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        note(f"note: {ckpt} has no {MANIFEST} (saved before neox checked checkpoints): loading it unverified")
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {e}"
    start = time.perf_counter()
    me, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = None
    for name in sorted(files)[me::world]:
        f, want = ckpt / name, files[name]
        if not f.is_file():
            mine = f"{name} is missing"
        elif f.stat().st_size != want["size"]:
            mine = f"{name} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        elif sha256(f) != want["sha256"]:
            mine = f"{name} fails its sha256 checksum"
        if mine:
            break
    problem = next((p for p in gather(mine) if p), None)
    if problem is None and announce:
        size = sum(v["size"] for v in files.values())
        note(
            f"checkpoint {ckpt}: {len(files)} files ({size / 1e6:.1f} MB) match {MANIFEST} "
            f"(sha256, {time.perf_counter() - start:.1f}s)"
        )
    return problem
