"""Elastic restart through the real launcher: `neox train CFG --nproc 2 --max-restarts 1`, rank 1 dies mid-run;
torchrun restarts both workers, they resume from the last checkpoint and end with the uninterrupted loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from neox.config import to_dict
from neox.train.trainer import Trainer
from tests.train.tiny_run import make_corpus, tiny_config

ITERS, SAVE_EVERY, CRASH_AT = 8, 3, 5

# Loaded into every worker through PYTHONPATH: on the first attempt rank 1 exits hard before step CRASH_AT,
# as a killed process would (no exception handling, no checkpoint).
CRASH_HOOK = f"""
import os
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    from neox.train import trainer as _t
    _step = _t.Trainer.train_step
    def train_step(self, micro_batches):
        if self.iteration == {CRASH_AT}:
            os._exit(17)
        return _step(self, micro_batches)
    _t.Trainer.train_step = train_step
"""


@pytest.mark.slow
def test_killed_rank_restarts_and_resumes(tmp_path):
    prefix = make_corpus(tmp_path / "corpus", docs=200)
    groups = dict(
        eval={"eval_iters": 0},
        logging={"log_interval": 1},
        # global batch 4 = 1 x 2 accumulation steps x dp 2: DDP syncs only the last micro-batch
        train={"train_iters": ITERS, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4},
    )
    torch.set_num_threads(1)
    straight = Trainer(tiny_config(prefix, **groups), quiet=True)
    straight.fit()

    run = tmp_path / "run"
    cfg = tiny_config(prefix, run, checkpoint={"save_interval": SAVE_EVERY}, **groups)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(to_dict(cfg)))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(CRASH_HOOK)
    path = os.pathsep.join(p for p in (str(tmp_path / "hook"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "neox.cli", "train", str(tmp_path / "cfg.yml"), "--nproc", "2", "--max-restarts", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "exitcode  : 17" in out or "exitcode: 17" in out, out[-5000:]  # the crash happened
    assert f"resumed from {run / 'iter_0000003'}" in out

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["iteration"]: r["loss"] for r in records if "loss" in r}  # the resumed run's value wins
    assert [r["iteration"] for r in records if "loss" in r].count(4) == 2  # step 4 ran before and after
    assert losses[ITERS] == pytest.approx(straight.losses[-1], abs=1e-5)
    assert (run / "latest").read_text().strip() == f"iter_{ITERS:07d}"
