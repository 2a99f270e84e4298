"""Sharded (DCP) checkpoints beyond what the trainer's save/load does: background saving on its own process
group, and consolidating a sharded checkpoint into one file.

Resharding itself needs nothing here: the trainer saves `get_state_dict(model, optimizer)`, whose tensors are
DTensors under FSDP/TP, and DCP records each shard's offset in the global tensor; loading into any other layout
(or one process) asks for the pieces that layout holds and DCP reads those slices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from neox.errors import NeoxError, ensure_dir


class AsyncSaver:
    """`dcp.async_save` with the pieces that make it safe in a training loop.

    Trap C: the background save's collectives run on a separate gloo group; on the default group they would
    interleave with the training step's collectives and deadlock. One save is in flight at a time: the next
    save (or `wait()`, which the trainer calls before exiting) first waits for the previous one and runs its
    `on_done` (rename into place, `latest` pointer) on the main thread of every rank.
    """

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: tuple | None = None

    def save(self, state_dict: dict, path: str | Path, on_done: Callable[[], None] | None = None) -> None:
        self.wait()
        # the state is copied to CPU memory before this returns, so the optimizer may step right away
        future = dcp.async_save(state_dict, checkpoint_id=str(path), process_group=self.group)
        self._pending = (future, on_done)

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def wait(self) -> None:
        if self._pending is None:
            return
        future, on_done = self._pending
        self._pending = None
        future.result()
        if on_done is not None:
            on_done()


def tensor_entries(checkpoint_dir: str | Path, prefix: str = "model.") -> dict[str, TensorStorageMetadata]:
    """Global shapes and dtypes of the tensors saved under `prefix` (keys without the prefix)."""
    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        raise NeoxError(f"{path} is not a DCP checkpoint directory (no .metadata file)")
    meta = FileSystemReader(str(path)).read_metadata()
    return {
        k[len(prefix) :]: v
        for k, v in meta.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }


def load_full_model_state(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model state dict (parameter name -> full tensor) of a sharded checkpoint, read in one
    process without torch.distributed, whatever layout saved it."""
    entries = tensor_entries(checkpoint_dir)
    if not entries:
        raise NeoxError(f"{checkpoint_dir}: the checkpoint holds no model tensors")
    model = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items()}
    from neox.train.checkpoint import _quiet_dcp

    _quiet_dcp()  # no_dist=True is the intent here, not something to warn about
    try:
        dcp.load({"model": model}, storage_reader=FileSystemReader(str(checkpoint_dir)), no_dist=True)
    except (Exception, CheckpointException) as e:  # a shard missing or cut short (DCP wraps the OSError/EOFError)
        lines = str(e).strip().splitlines()
        raise NeoxError(
            f"{checkpoint_dir}: cannot read the checkpoint's shards ({lines[-1] if lines else type(e).__name__}); "
            "it is incomplete or damaged: use another checkpoint (or copy it again)"
        ) from None
    if dtype is not None:
        model = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.items()}
    return model


def consolidate(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model weights of `checkpoint` (a run directory: its latest; or one iter_* directory) to one
    torch.save file that `GPT(cfg).load_state_dict(torch.load(out))` accepts."""
    from neox.train.checkpoint import resolve

    ckpt = resolve(checkpoint)
    out = Path(out)
    ensure_dir(out.parent, "OUT's folder")
    state = load_full_model_state(ckpt, dtype)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return ckpt
