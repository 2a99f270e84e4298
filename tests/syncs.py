"""Count host syncs structurally: the calls that read a tensor's value on the host (`.item()`, `.cpu()`,
`.tolist()`, `float()`, `int()`, `bool()` of a tensor, `torch.cuda.synchronize()`), made by neox's own code.

On a GPU each of these waits for the device to finish its queue; on a CPU they are free, which is why they are
counted rather than timed. Calls from inside torch (an optimizer reading its CPU step counter) are left out:
what is counted is what neox asks for, attributed to the neox file and line that asked.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

NEOX = str(Path(__file__).resolve().parents[1] / "neox")
READS = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _caller() -> str | None:
    frame = sys._getframe(1)
    while frame.f_code.co_filename == __file__:  # the wrappers (nested counters wrap each other)
        frame = frame.f_back
    name = frame.f_code.co_filename  # the frame that called the patched method
    return f"{Path(name).relative_to(Path(NEOX).parent)}:{frame.f_lineno}" if name.startswith(NEOX) else None


@contextlib.contextmanager
def count_syncs(events: list[str] | None = None):
    """Within the block, append "neox/FILE.py:LINE name" to `events` (returned) for each host read neox makes."""
    events = [] if events is None else events
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    own = {name for name in READS if name in vars(torch.Tensor)}  # the rest are inherited from TensorBase
    sync = torch.cuda.synchronize

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            where = _caller()
            if where is not None:
                events.append(f"{where} {name}")
            return fn(*args, **kwargs)

        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, counted(name, fn))
        torch.cuda.synchronize = counted("cuda.synchronize", sync)
        yield events
    finally:
        for name, fn in originals.items():
            if name in own:
                setattr(torch.Tensor, name, fn)
            else:
                delattr(torch.Tensor, name)
        torch.cuda.synchronize = sync
