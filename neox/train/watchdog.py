"""A rank that stops making progress ends its process instead of hanging the job.

Two ways a distributed run hangs: a rank is stuck outside any collective (a dead filesystem, a wedged kernel, a
deadlock in data loading) and the others wait for it in one; or every rank waits in a collective that will never
complete. The process group's timeout (parallel.dist_timeout_minutes) ends the waiting ranks: gloo raises
"Timed out waiting Nms for recv operation", which names neither the rank nor the operation, so
`collective_timeout` turns it into one line that does. The stuck rank itself never returns from where it is, so a
`Watchdog` thread watches for progress beats from the training loop (one per finished step, one before each
checkpoint save) and, after `timeout_s` without one, prints the rank, the iteration, the pending operation and
the innermost frame of the main thread, and exits the process with EXIT_HANG. torchrun then sees a failed
worker and stops the others, or restarts the group from the last checkpoint under `--max-restarts`.

The watchdog exits with `os._exit`: a normal exit runs the process group's destructors, which can wait on the
very collective that hung.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from neox.parallel.worker_status import EXIT_HANG, write_status


def rank_label() -> str:
    """ "rank R of W" under torchrun, "the trainer" in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')} of {world}" if world > 1 else "the trainer"


def _die(line: str, record: dict) -> None:
    sys.stdout.flush()
    os.write(2, (line + "\n").encode())
    write_status(record)
    os._exit(EXIT_HANG)


def _main_thread_frame() -> str:
    """Where the main thread is now: its innermost frame as "function (file:line)"."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "unknown"
    code = frame.f_code
    return f"{code.co_name} ({code.co_filename}:{frame.f_lineno})"


class Watchdog:
    """Ends the process after `timeout_s` seconds without a `beat`; `timeout_s` None or <= 0 = off.

    `beat(iteration, pending)` says the run is at `iteration` and starting `pending` (e.g. "train step 6"). The
    thread checks about 20 times per timeout (at most once a second), so it fires within 5% of `timeout_s`.
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.iteration = 0
        self.pending = "start-up"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, iteration: int, pending: str) -> None:
        # plain assignments: the step pays no lock and no system call
        self.iteration, self.pending, self._last = iteration, pending, time.monotonic()

    def start(self) -> None:
        if self.timeout_s is None or self._thread is not None:
            return
        self._last = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="neox-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 20)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)
                return  # fires once (in a process, _fire does not return)

    def _fire(self, idle: float) -> None:
        where = _main_thread_frame()
        line = (
            f"neox train: error: {rank_label()}: no progress for {idle:.0f} s (train.hang_timeout "
            f"{self.timeout_s:g} s) after iteration {self.iteration}, pending: {self.pending}; main thread in "
            f"{where}; exiting with code {EXIT_HANG} (torchrun --max-restarts restarts from the last checkpoint)"
        )
        _die(line, {"event": "hang", "iteration": self.iteration, "pending": self.pending, "where": where})


def is_collective_timeout(error: BaseException) -> bool:
    """A process group's timeout as gloo and NCCL word it ("Timed out waiting 1800000ms for recv operation",
    NCCL's watchdog "Watchdog caught collective operation timeout")."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("Timed out waiting" in text or "operation timeout" in text)


def collective_timeout(error: BaseException, watchdog: Watchdog, timeout_min: float) -> None:
    """One line for a collective that timed out on this rank, then exit with EXIT_HANG (see the module doc)."""
    detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    line = (
        f"neox train: error: {rank_label()}: a collective did not finish within parallel.dist_timeout_minutes "
        f"{timeout_min:g} after iteration {watchdog.iteration}, pending: {watchdog.pending} (another rank is "
        f"stuck or gone; backend: {detail}); exiting with code {EXIT_HANG}"
    )
    _die(line, {"event": "collective_timeout", "iteration": watchdog.iteration, "pending": watchdog.pending})
