"""A torchrun worker dies with torchrun: torch elastic starts workers in sessions of their own, so a kill -9 of the
job's process group reaches only the launcher and torchrun (found by tests/train/test_kill_resume.py: the two
workers of a `--nproc 2` run trained on, orphaned, after the kill)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# stands in for torchrun: starts the worker as torch elastic does (its own session), prints its pid, waits
AGENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True, env=os.environ)
    print(worker.pid, flush=True)
    time.sleep(120)
    """
)
WORKER = "import time; from neox.cli import _die_with_torchrun; _die_with_torchrun(); print('ready', flush=True); time.sleep(120)"


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _worker_after_agent_killed(env: dict) -> bool:
    """Kill -9 the stand-in agent's process group once its worker is ready; whether the worker still runs 2 s later."""
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, WORKER], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    pid = int(agent.stdout.readline())
    time.sleep(1.0)  # the worker has long reached _die_with_torchrun (it imports only neox.cli)
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    end = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    survived = _alive(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    return survived


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_dies_when_torchrun_is_killed():
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    assert not _worker_after_agent_killed({**env, "TORCHELASTIC_RUN_ID": "test"})
    # the control: a process that is not a torchrun worker is left alone (nothing else changed)
    assert _worker_after_agent_killed(env)
