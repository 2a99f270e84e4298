"""Why a torchrun worker exited, told to the `neox train --nproc` launcher that started it, and the exit codes.

torchrun reports only "a worker failed" (exit code 1) or success, and it restarts failed workers under
`--max-restarts`. A worker that stopped on purpose (a stop signal, train.max_runtime) must not be restarted, so
it exits 0 and writes a record here; the launcher reads the records and returns EXIT_PREEMPTED. A worker that
ends a hang exits EXIT_HANG (torchrun may restart it, as it should) and leaves a record too, so that the
launcher can return EXIT_HANG rather than torchrun's 1 when the job finally gives up.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint saved; run the same command again to resume
EXIT_HANG = 124  # "timed out", as GNU timeout reports it: no progress within train.hang_timeout, or a collective
STATUS_DIR_ENV = "NEOX_LAUNCH_STATUS_DIR"  # the launcher's folder for its workers' records
JOB_START_ENV = "NEOX_JOB_START"  # time.time() when the launcher started: train.max_runtime counts from it
# a stop signal this long after the first is a second one (exit at once); copies arriving closer are the same
REPEAT_WINDOW_S = 1.0
RESUME_MARKER = "preempted.json"  # in the save directory: its newest checkpoint is a stop's, resume from it


def write_status(record: dict) -> None:
    """This worker's record, one file per rank and torchrun attempt (nothing outside a neox launcher)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    with contextlib.suppress(OSError):  # the launcher then reports torchrun's own exit code
        Path(folder, f"{_attempt_and_rank()}.json").write_text(json.dumps(record))


def _attempt_and_rank() -> str:
    return f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.rank{os.environ.get('RANK', '0')}"


def register_worker() -> None:
    """Leave this worker's pid for the launcher, which sends stop signals to the workers directly."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if folder:
        with contextlib.suppress(OSError):
            Path(folder, f"{_attempt_and_rank()}.pid").write_text(str(os.getpid()))


def worker_pids(folder: str | Path) -> list[int]:
    """The pids the latest torchrun attempt's workers registered (an empty list before they have)."""
    by_attempt: dict[int, list[int]] = {}
    for path in Path(folder).glob("attempt*.rank*.pid"):
        with contextlib.suppress(OSError, ValueError):
            by_attempt.setdefault(int(path.name.split(".")[0][len("attempt") :]), []).append(int(path.read_text()))
    return by_attempt[max(by_attempt)] if by_attempt else []


def read_statuses(folder: str | Path) -> dict[int, list[dict]]:
    """The workers' records by torchrun attempt (0 = the first start)."""
    out: dict[int, list[dict]] = {}
    for path in sorted(Path(folder).glob("attempt*.rank*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # cut short when the worker was killed: no reason known
        out.setdefault(int(path.name.split(".")[0][len("attempt") :]), []).append(record)
    return out


def launcher_exit_code(torchrun_code: int, folder: str | Path, workers: int) -> int:
    """The launcher's exit code from torchrun's and the last attempt's records of this node's `workers`:
    EXIT_PREEMPTED when every worker stopped with a saved checkpoint, EXIT_HANG when torchrun failed and a
    worker reported a hang, else torchrun's code."""
    attempts = read_statuses(folder)
    last = attempts[max(attempts)] if attempts else []
    stops = [r for r in last if r.get("event") == "preempted"]
    if len(stops) == workers and all(r.get("saved") for r in stops):
        return EXIT_PREEMPTED
    if torchrun_code and any(r.get("event") in ("hang", "collective_timeout") for r in last):
        return EXIT_HANG
    return torchrun_code


def mark_resumable(save_dir: str | Path, checkpoint: str | Path, reason: str) -> None:
    """After a stop with a saved `checkpoint`: the same command (without checkpoint.load) resumes from it."""
    marker = Path(save_dir, RESUME_MARKER)
    tmp = marker.with_suffix(".tmp")
    with contextlib.suppress(OSError):  # without it, the rerun asks for --set load=... in one line
        tmp.write_text(json.dumps({"checkpoint": Path(checkpoint).name, "reason": reason}))
        os.replace(tmp, marker)


def resumable_after_stop(save_dir: str | Path) -> bool:
    """Whether `save_dir`'s newest checkpoint is the one a stop saved (nothing newer was written since)."""
    try:
        marked = json.loads(Path(save_dir, RESUME_MARKER).read_text())["checkpoint"]
        return Path(save_dir, "latest").read_text().strip() == marked
    except (OSError, ValueError, KeyError, TypeError):
        return False
