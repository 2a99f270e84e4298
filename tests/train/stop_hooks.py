"""Test-only hooks for `neox train` subprocesses, loaded as sitecustomize through PYTHONPATH (see `hook_env`).

They wrap Trainer methods from the outside, driven by environment variables the tests set, so that production
code has no test switch in it:
- NEOX_TEST_STEP_SLEEP=S: each optimizer step also sleeps S seconds (a run slow enough to be signalled or timed);
- NEOX_TEST_SELF_SIGNAL=ITER:SIG[,ITER:SIG...]: before step ITER + 1 the process sends itself signal SIG;
- NEOX_TEST_HANG=RANK:ITER: that rank stops for good before step ITER + 1 (writes NEOX_TEST_OUT/hang_start);
- NEOX_TEST_OUT=DIR: at the end of fit every rank writes DIR/rank{R}.json: its iteration and stop record.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

HOOK = """
import json, os, signal, time
from pathlib import Path
from neox.train import trainer as _t

_step, _fit = _t.Trainer.train_step, _t.Trainer.fit
_sleep = float(os.environ.get("NEOX_TEST_STEP_SLEEP", "0"))
_signals = {}
for part in filter(None, os.environ.get("NEOX_TEST_SELF_SIGNAL", "").split(",")):
    it, sig = part.split(":")
    _signals.setdefault(int(it), []).append(getattr(signal, sig))
_hang = os.environ.get("NEOX_TEST_HANG")
_out = os.environ.get("NEOX_TEST_OUT")
_rank = os.environ.get("RANK", "0")

def train_step(self, micro_batches):
    for sig in _signals.pop(self.iteration, []):
        os.kill(os.getpid(), sig)
        time.sleep(1.5)  # longer than the repeat window: a second one counts as a second signal
    if _hang and _hang.split(":") == [_rank, str(self.iteration)]:
        Path(_out, "hang_start").write_text(repr(time.time()))
        while True:
            time.sleep(60)
    out = _step(self, micro_batches)
    if _sleep:
        time.sleep(_sleep)
    return out

def fit(self, *args, **kwargs):
    summary = _fit(self, *args, **kwargs)
    if _out:
        Path(_out, f"rank{_rank}.json").write_text(
            json.dumps({"iteration": self.iteration, "stopped": summary.get("stopped")})
        )
    return summary

_t.Trainer.train_step, _t.Trainer.fit = train_step, fit
"""


def hook_env(tmp: Path, **variables: str) -> dict:
    """The environment of a `neox train` subprocess with the hooks loaded and `variables` set."""
    hook_dir = tmp / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOX_TEST_")}
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **variables}


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_iteration(proc: subprocess.Popen, run: Path, iteration: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not any(r.get("iteration", 0) >= iteration and "loss" in r for r in records(run)):
        assert proc.poll() is None, f"the run ended before iteration {iteration}: {proc.communicate()}"
        assert time.monotonic() < end, f"no iteration {iteration} within {timeout} s"
        time.sleep(0.05)
