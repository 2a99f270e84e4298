"""Stopping a run cleanly before it is killed: signals and a wall-clock budget, agreed on by every rank.

SIGTERM (what a scheduler sends before it kills), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's `--signal=USR1@SECS`
warning) ask the run to stop: the Trainer finishes the step it is in, saves a checkpoint at the step boundary on
every rank and `neox train` exits with EXIT_PREEMPTED; the same command resumes it. A second stop signal, at
least REPEAT_WINDOW_S after the first, exits at once with 128 + the signal's number, saving nothing. Copies of
one signal that arrive together are one request: a job-wide signal reaches a worker directly and again through
its launcher and torchrun.

`train.max_runtime` is a wall-clock budget counted from the start of the job (the launcher's start under
`--nproc`, so torchrun restarts count against it too): the run stops at the last step boundary from which the
next step(s) and a checkpoint save still fit in it. Step time is the longest of the last few step intervals;
save time the last save's, or before any save an estimate from the size of the state (SAVE_BYTES_PER_S).

Agreement under torchrun: every step boundary posts this rank's stop code (0, max_runtime, or a signal number)
to a MAX all-reduce on a gloo group of its own, asynchronously, and waits for the previous boundary's result,
which finished long ago. No step waits on the network or syncs the device for it (the tensor is a CPU int,
the group is not the one the gradients use), yet every rank reads the same value at the same boundary, so all
stop after the same step: one step after the first rank saw the request.

Rank 0 marks the save directory (neox.parallel.worker_status.RESUME_MARKER), so that the same command, even
without checkpoint.load, resumes from that checkpoint (neox.parallel.launch.resume_dir). Under torchrun a
worker that stopped this way exits 0, so that torchrun neither restarts it (`--max-restarts`) nor counts a
failure, and leaves a record in the launcher's status folder; the launcher turns those records into
EXIT_PREEMPTED.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from neox.parallel.worker_status import (
    EXIT_PREEMPTED,
    JOB_START_ENV,
    REPEAT_WINDOW_S,
    mark_resumable,
    register_worker,
    write_status,
)
from neox.train.watchdog import Watchdog

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
SAVE_BYTES_PER_S = 100e6  # a slow shared filesystem: the save estimate before a save has been timed
STEP_WINDOW = 8  # step intervals the step-time estimate looks back over
_MAX_RUNTIME = 1  # stop code of the budget; signals use their numbers (all > 1), MAX picks a signal over it

_PROCESS_START = time.time()


def job_start() -> float:
    """When the job started: the launcher's clock under torchrun, else when this module was imported (before the
    model, data and process group are built, which count against the budget)."""
    try:
        return float(os.environ[JOB_START_ENV])
    except (KeyError, ValueError):
        return _PROCESS_START


def reason_name(code: int) -> str:
    return "max_runtime" if code == _MAX_RUNTIME else signal.Signals(code).name


class SignalStop:
    """Handlers for STOP_SIGNALS while armed: the first records the request, a later one exits at once."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum = 0
        self._first_at: float | None = None
        self._previous: dict = {}

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return  # Python delivers signals to the main thread only; a library caller elsewhere keeps its own
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def disarm(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _say(self, text: str) -> None:
        if self.announce:
            os.write(2, (text + "\n").encode())  # not print(): the handler may interrupt a print in progress

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self._first_at is None:
            self.signum, self._first_at = signum, now
            self._say(
                f"neox train: {name}: saving a checkpoint at the next step boundary, then exiting with code "
                f"{EXIT_PREEMPTED} (rerun the same command to resume; send the signal again to exit at once)"
            )
        elif now - self._first_at >= REPEAT_WINDOW_S:
            os.write(2, f"neox train: second stop signal ({name}): exiting at once, nothing saved\n".encode())
            os._exit(128 + signum)


class Stopper:
    """The Trainer's stop decisions (`due` at each step boundary) and progress beats for the watchdog.

    `world_size` > 1 needs the default process group (the stop flag gets a gloo group of its own, created here:
    every rank must build its Stopper at the same point). `announce`: print the signal lines (logging rank).
    `state_bytes`: this rank's checkpoint size, for the save-time estimate; `timeout_min`: the flag group's
    collective timeout (parallel.dist_timeout_minutes).
    """

    def __init__(
        self,
        max_runtime_s: float | None,
        world_size: int = 1,
        announce: bool = True,
        hang_timeout_s: float | None = None,
        state_bytes: int = 0,
        timeout_min: float = 30.0,
    ):
        self.signals = SignalStop(announce)
        self.watchdog = Watchdog(hang_timeout_s)
        self.deadline = job_start() + max_runtime_s if max_runtime_s else None
        self.max_runtime_s = max_runtime_s
        self.group = None
        if world_size > 1 and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_min))
        self._pending: tuple | None = None  # (work, tensor) of the last posted stop-code all-reduce
        self._boundary: float | None = None
        self._steps: list[float] = []
        self.save_s = max(1.0, state_bytes / SAVE_BYTES_PER_S)
        self.reason: str | None = None

    # ------------------------------------------------------------------ lifetime (Trainer.fit)
    def arm(self, iteration: int) -> None:
        self.signals.arm()
        register_worker()  # from now on the launcher signals this process directly
        self.watchdog.beat(iteration, f"train step {iteration + 1}")
        self.watchdog.start()
        self._boundary = time.monotonic()

    def disarm(self) -> None:
        self.watchdog.stop()
        self.signals.disarm()
        self._pending = None  # a posted all-reduce finished on every rank or the run is failing anyway

    # ------------------------------------------------------------------ the loop
    def timed_save(self, save, iteration: int):
        """Run `save()`, beating the watchdog first and timing it for the budget."""
        self.watchdog.beat(iteration, f"checkpoint save at iteration {iteration}")
        t0 = time.monotonic()
        out = save()
        self.save_s = time.monotonic() - t0
        return out

    def due(self, iteration: int) -> str | None:
        """At the boundary after step `iteration`: the reason to stop here, or None (same answer on every rank)."""
        now = time.monotonic()
        if self._boundary is not None:
            self._steps = [*self._steps[-(STEP_WINDOW - 1) :], now - self._boundary]
        self._boundary = now
        self.watchdog.beat(iteration, f"train step {iteration + 1}")
        code = self._local_code()
        if self.group is not None:
            code = self._agreed(code)
        if code:
            self.reason = reason_name(code)
        return self.reason

    def _local_code(self) -> int:
        if self.signals.signum:
            return self.signals.signum
        if self.deadline is not None:
            # the decision posted now takes effect one boundary later under torchrun: two steps must fit then
            steps = (2 if self.group is not None else 1) * max(self._steps, default=0.0)
            if time.time() + steps + self.save_s >= self.deadline:
                return _MAX_RUNTIME
        return 0

    def _agreed(self, code: int) -> int:
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
            self._pending = None
        if not agreed:
            flag = torch.tensor([code], dtype=torch.int32)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def finish(self) -> None:
        """The loop ended by itself: wait for the last posted all-reduce (every rank posted it)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    # ------------------------------------------------------------------ the report
    def stop_record(self, iteration: int, checkpoint, saved: bool) -> dict:
        """The metrics.jsonl event of a stop (`saved`: a checkpoint of `iteration` is in the save directory,
        written now at `checkpoint` or by the interval save just before), and what the launcher is told."""
        record = {
            "iteration": iteration,
            "event": "preempted",
            "reason": self.reason,
            "saved": saved,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
        }
        if self.reason == "max_runtime":
            record["max_runtime_s"] = self.max_runtime_s
            record["elapsed_s"] = time.time() - job_start()
        return record


def exit_code(record: dict | None) -> int:
    """`neox train`'s exit code after the Trainer's stop record (None: it ran to the end, 0). EXIT_PREEMPTED
    when the checkpoint was saved; without one (no checkpoint.save, a failed save) 128 + the signal, or 1 at
    max_runtime. Under torchrun 0 after a saved stop, the launcher being told through its status folder."""
    if not record:
        return 0
    if record["saved"] and os.environ.get("RANK", "0") == "0":
        mark_resumable(Path(record["checkpoint"]).parent, record["checkpoint"], record["reason"])
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        write_status(record)
        if record["saved"]:
            return 0
    if record["saved"]:
        return EXIT_PREEMPTED
    return 1 if record["reason"] == "max_runtime" else 128 + signal.Signals[record["reason"]].value
