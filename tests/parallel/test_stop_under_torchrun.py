"""`neox train --nproc 2` through the real launcher: a stop signal sent to the launcher alone reaches both workers,
they stop after the same step with one consistent checkpoint and the launcher exits 75; a rank stuck outside
any collective ends the job within train.hang_timeout with a line naming it, and the launcher exits 124."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from neox.config import to_dict
from neox.parallel.worker_status import EXIT_HANG, EXIT_PREEMPTED
from neox.train import checkpoint as ckpt
from tests.train.stop_hooks import hook_env, records, wait_for_iteration
from tests.train.tiny_run import make_corpus, tiny_config

# global batch 4 = 1 x 2 accumulation steps x dp 2
GROUPS = dict(
    eval={"eval_iters": 0},
    logging={"log_interval": 1},
    train={"train_iters": 40, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4},
)


def launch_cmd(tmp_path, **train) -> tuple[list[str], object]:
    prefix = make_corpus(tmp_path / "corpus", docs=200)
    run = tmp_path / "run"
    cfg = tiny_config(prefix, run, **{**GROUPS, "train": {**GROUPS["train"], **train}})
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(to_dict(cfg)))
    return [sys.executable, "-m", "neox.cli", "train", str(tmp_path / "cfg.yml"), "--nproc", "2"], run


@pytest.mark.slow
def test_a_signal_to_the_launcher_stops_both_ranks_after_the_same_step(tmp_path):
    cmd, run = launch_cmd(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = hook_env(tmp_path, NEOX_TEST_STEP_SLEEP="0.1", NEOX_TEST_OUT=str(out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_iteration(proc, run, 3, timeout=240)
    proc.send_signal(signal.SIGTERM)  # the launcher only: it passes the signal on to the workers
    text = proc.communicate(timeout=240)[0]
    assert proc.returncode == EXIT_PREEMPTED, text[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    stopped = {r["iteration"] for r in ranks}
    assert len(stopped) == 1 and all(r["stopped"]["reason"] == "SIGTERM" for r in ranks), ranks
    (iteration,) = stopped
    assert 3 <= iteration < 40
    event = [r for r in records(run) if r.get("event") == "preempted"][-1]
    assert event["iteration"] == iteration and event["saved"]
    # one checkpoint of that step, complete (its manifest verifies) and loadable in one process
    assert ckpt.resolve(run, verify=True).name == ckpt.checkpoint_name(iteration)
    weights = ckpt.load_full_model_state(run / ckpt.checkpoint_name(iteration))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_within_the_hang_timeout_naming_itself(tmp_path):
    timeout = 6
    cmd, _ = launch_cmd(tmp_path, hang_timeout=timeout)
    out = tmp_path / "out"
    out.mkdir()
    env = hook_env(tmp_path, NEOX_TEST_HANG="1:3", NEOX_TEST_OUT=str(out))  # rank 1 stops before step 4
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    ended = time.time()
    text = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_HANG, text[-5000:]
    hang_start = float((out / "hang_start").read_text())
    # torchrun's teardown after the watchdog's exit takes seconds more on a loaded machine
    assert ended - hang_start < timeout + 30, f"the job outlived the hang timeout by more than a teardown: {text}"
    line = next(s for s in text.splitlines() if "rank 1 of 2: no progress for" in s)
    idle = float(line.split("no progress for ")[1].split(" s")[0])
    assert timeout <= idle <= timeout + 2, line  # it fired on time (polled 20 times per timeout)
    assert "after iteration 3, pending: train step 4" in line and "sitecustomize.py" in line, line
    assert f"exiting with code {EXIT_HANG}" in line
