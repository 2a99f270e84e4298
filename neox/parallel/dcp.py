"""Background saving of sharded (DCP) checkpoints on a process group of their own (the trainer's save uses it
with checkpoint.async_save; consolidation into one file is neox.train.checkpoint.consolidate).

Resharding itself needs nothing here: the trainer saves `get_state_dict(model, optimizer)`, whose tensors are
DTensors under FSDP/TP, and DCP records each shard's offset in the global tensor; loading into any other layout
(or one process) asks for the pieces that layout holds and DCP reads those slices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException


class AsyncSaver:
    """`dcp.async_save` with the pieces that make it safe in a training loop.

    The background save's collectives run on a separate gloo group; on the default group they would
    interleave with the training step's collectives and deadlock. One save is in flight at a time: the next
    save (or `wait()`, which the trainer calls before exiting) first waits for the previous one and runs its
    `on_done` (rename into place, `latest` pointer) on the main thread of every rank; a save that failed
    (disk full) runs `on_error(exception)` there instead, or re-raises when there is none.
    """

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: tuple | None = None

    def save(
        self,
        state_dict: dict,
        path: str | Path,
        on_done: Callable[[], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.wait()
        # the state is copied to CPU memory before this returns, so the optimizer may step right away
        try:
            future = dcp.async_save(state_dict, checkpoint_id=str(path), process_group=self.group)
        except (OSError, RuntimeError, CheckpointException) as e:
            if on_error is None:
                raise
            on_error(e)
            return
        self._pending = (future, on_done, on_error)

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def wait(self) -> None:
        if self._pending is None:
            return
        future, on_done, on_error = self._pending
        self._pending = None
        try:
            future.result()
        except (OSError, RuntimeError, CheckpointException) as e:
            if on_error is None:
                raise
            on_error(e)
            return
        if on_done is not None:
            on_done()
