"""`profile: true`: a PyTorch profiler trace and a memory record of a few training steps.

GPT-NeoX's keys: profiling spans the steps that begin at iteration `profile_step_start` through the one that
begins at `profile_step_stop` (its loop counts completed steps from 0), so the defaults 10 and 12 record three
steps after warm-up. What it writes, per rank, to `logging.profile_dir` (default: RUN/profile):
- trace_rankR.json: Chrome trace (open in https://ui.perfetto.dev or chrome://tracing);
- ops_rankR.txt: the operators by self time (the table torch.profiler prints);
- memory: on CUDA memory_snapshot_rankR.pickle, the allocator's history for https://pytorch.org/memory_viz;
  on CPU memory_timeline_rankR.json, the profiler's memory timeline (timestamps and bytes by category).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from neox.config.schema import LoggingConfig
from neox.errors import NeoxError


class StepProfiler:
    """Call `before_step(i)` / `after_step(i)` around each step, i = completed steps before it."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path | None, device: torch.device, rank: int):
        self.start, self.stop = cfg.profile_step_start, cfg.profile_step_stop
        base = cfg.profile_dir or (Path(run_dir) / "profile" if run_dir is not None else Path("profile"))
        self.dir = Path(base)
        self.device = device
        self.rank = rank
        self._prof = None
        self.written: list[Path] = []

    def before_step(self, iteration: int) -> None:
        if iteration != self.start or self._prof is not None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NeoxError(f"logging.profile_dir {self.dir}: cannot create it ({e.strerror or e})") from None
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        # shapes and stacks make the trace readable and are what the CPU memory timeline needs
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=True)
        self._prof.__enter__()

    def after_step(self, iteration: int) -> None:
        if self._prof is not None and iteration >= self.stop:
            self._finish()

    def close(self) -> None:
        """End a profile the run stopped inside of (train_iters reached first): what was recorded is written."""
        if self._prof is not None:
            self._finish()

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.__exit__(None, None, None)
        r = self.rank
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        # the operator table first: torch 2.13 fails to parse the events again after a memory-timeline export
        ops = self.dir / f"ops_rank{r}.txt"
        ops.write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        trace = self.dir / f"trace_rank{r}.json"
        prof.export_chrome_trace(str(trace))
        self.written += [trace, ops]
        if self.device.type == "cuda":
            snapshot = self.dir / f"memory_snapshot_rank{r}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
        else:
            snapshot = self.dir / f"memory_timeline_rank{r}.json"
            with _quiet_deprecation():
                prof.export_memory_timeline(str(snapshot), device="cpu")
        self.written.append(snapshot)


@contextlib.contextmanager
def _quiet_deprecation():
    """export_memory_timeline warns that CUDA has a newer tool; on CPU it is the one there is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield
