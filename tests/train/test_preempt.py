"""Preemption as a user meets it: `neox train` subprocesses of a tiny fp32 CPU config are sent SIGUSR1 / SIGTERM
mid-run or run out of train.max_runtime; each saves at a step boundary, exits 75, and the same command resumes
to the uninterrupted run's losses and weights. Signal-handler details are checked in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from neox.config import to_dict
from neox.parallel.worker_status import EXIT_PREEMPTED, JOB_START_ENV
from neox.train import checkpoint as ckpt
from neox.train.preempt import REPEAT_WINDOW_S, SignalStop, Stopper
from neox.train.trainer import Trainer

from .stop_hooks import hook_env, records, wait_for_iteration
from .tiny_run import make_corpus, tiny_config

ITERS = 24
GROUPS = dict(train={"train_iters": ITERS}, eval={"eval_iters": 0}, logging={"log_interval": 1})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("preempt_corpus"), docs=200)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """The uninterrupted run: its per-step losses and final weights."""
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(corpus, tmp_path_factory.mktemp("straight") / "run", **GROUPS), quiet=True)
    trainer.fit()
    return trainer.losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def write_config(tmp_path: Path, corpus: str, **train) -> tuple[list[str], Path]:
    run = tmp_path / "run"
    groups = {**GROUPS, "train": {**GROUPS["train"], **train}}
    cfg = tiny_config(corpus, run, **groups)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(to_dict(cfg)))
    return [sys.executable, "-m", "neox.cli", "train", str(tmp_path / "cfg.yml")], run


def stop_event(run: Path) -> dict:
    return [r for r in records(run) if r.get("event") == "preempted"][-1]


def assert_matches_straight(run: Path, straight) -> None:
    losses, weights = straight
    by_step = {r["iteration"]: r["loss"] for r in records(run) if "loss" in r}  # a re-run step's value wins
    assert [by_step[i] for i in range(1, ITERS + 1)] == pytest.approx(losses, abs=1e-6)
    saved = ckpt.load_full_model_state(ckpt.resolve(run))
    assert saved.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sigusr1_then_sigterm_mid_run_save_exit_75_and_the_same_command_resumes_exactly(corpus, tmp_path, straight):
    cmd, run = write_config(tmp_path, corpus)
    env = hook_env(tmp_path, NEOX_TEST_STEP_SLEEP="0.1")
    stops = []
    for sig, after in ((signal.SIGUSR1, 3), (signal.SIGTERM, None)):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_iteration(proc, run, after if after else stops[-1] + 3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
        event = stop_event(run)
        assert event["reason"] == sig.name and event["saved"] and event["iteration"] < ITERS
        assert (run / "latest").read_text().strip() == ckpt.checkpoint_name(event["iteration"])
        assert f"neox train: {sig.name}: saving a checkpoint at the next step boundary" in err
        assert f"stopped at iteration {event['iteration']} ({sig.name}): checkpoint saved" in out
        stops.append(event["iteration"])
    assert stops[0] < stops[1]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run / ckpt.checkpoint_name(stops[1])}" in done.stdout
    assert_matches_straight(run, straight)


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_saving(corpus, tmp_path):
    cmd, run = write_config(tmp_path, corpus)
    # two SIGTERMs 1.5 s apart inside step 4: the first asks for a stop, the second ends the process there
    env = hook_env(tmp_path, NEOX_TEST_SELF_SIGNAL="3:SIGTERM,3:SIGTERM")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "neox train: second stop signal (SIGTERM): exiting at once, nothing saved" in proc.stderr
    assert not (run / "latest").exists() and not ckpt.list_checkpoints(run)
    assert max(r["iteration"] for r in records(run)) == 3  # step 4 never finished


@pytest.mark.slow
def test_max_runtime_saves_before_the_budget_ends_and_the_same_command_resumes(corpus, tmp_path, straight):
    budget = 20.0
    cmd, run = write_config(tmp_path, corpus, max_runtime=f"{budget:g}s")
    start = time.time()
    # 1 s steps: the 24 steps cannot fit in the budget, whatever the start-up takes
    env = hook_env(tmp_path, NEOX_TEST_STEP_SLEEP="1.0", **{JOB_START_ENV: repr(start)})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    event = stop_event(run)
    assert event["reason"] == "max_runtime" and event["saved"] and 0 < event["iteration"] < ITERS
    assert event["max_runtime_s"] == budget and event["elapsed_s"] < budget
    latest = run / "latest"
    assert latest.read_text().strip() == ckpt.checkpoint_name(event["iteration"])
    assert latest.stat().st_mtime < start + budget  # the checkpoint was complete within the budget
    # resumed at full speed on a longer budget (on a loaded machine start-up alone can take most of 20 s)
    longer = [*cmd, "--set", "max_runtime=1h"]
    done = subprocess.run(longer, env=hook_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_matches_straight(run, straight)


def test_copies_of_one_signal_are_one_request_and_disarm_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stop = SignalStop(announce=False)
    stop.arm()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # within REPEAT_WINDOW_S: the same request, not "exit at once"
        time.sleep(0.01)
        assert stop.signum == signal.SIGUSR1
    finally:
        stop.disarm()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert REPEAT_WINDOW_S >= 0.5


def test_max_runtime_stops_when_the_next_step_and_the_save_no_longer_fit(monkeypatch):
    monkeypatch.setenv(JOB_START_ENV, repr(time.time()))
    stopper = Stopper(max_runtime_s=10.0)
    stopper.save_s = 2.0
    stopper._steps = [1.0, 3.0, 1.0]  # the longest recent step counts
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 4.9)  # 4.9 + 3 + 2 < 10: go on
    assert stopper._local_code() == 0
    monkeypatch.setattr(time, "time", lambda: now + 5.1)  # 5.1 + 3 + 2 > 10: stop here
    assert stopper._local_code() == 1
    stopper.signals.signum = signal.SIGTERM  # a signal wins over the budget
    assert stopper._local_code() == signal.SIGTERM
