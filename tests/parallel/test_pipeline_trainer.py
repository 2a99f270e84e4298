"""The real Trainer under pipeline parallelism (neox.parallel.runtime picks the pipeline runner): pp=2 with
1F1B over 4 accumulated micro-batches follows the single-process losses (fp32, bf16 autocast, fp16 with loss
scaling), evaluates through the pipeline, and its checkpoint (the tied embedding saved from both end stages
under one name) resumes in one process with the uninterrupted run's losses."""

from __future__ import annotations

import json

import pytest
import torch

from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.train.tiny_run import make_corpus, tiny_config

ITERS, STOP = 6, 3
PRECISIONS = ("bf16", "fp16")
# groups the extras below (parallel, checkpoint) do not touch
BASE = {"model": {"vocab_size": 384}, "eval": {"eval_interval": 2, "eval_iters": 1},
        "train": {"train_iters": ITERS, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4}}


@pytest.mark.slow
def test_trainer_pp2_matches_one_process_and_resumes_there(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", docs=200)
    torch.set_num_threads(1)
    straight = Trainer(tiny_config(corpus, **BASE), quiet=True)
    straight.fit()
    assert len(straight.losses) == ITERS and straight.losses[-1] != straight.losses[0]

    save = str(tmp_path / "run")
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    pp2 = {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"}
    low = [{"name": p, "stop_at": STOP, "groups": {**BASE, "parallel": pp2, "precision": {"precision": p}}}
           for p in PRECISIONS]
    spec.write_text(json.dumps({"data": corpus, "runs": [{"name": "pp2", "stop_at": STOP, "groups": {
        **BASE, "parallel": pp2, "checkpoint": {"save": save, "save_interval": STOP}}}, *low]}))
    torchrun("trainer_worker.py", 2, str(spec), str(out))
    got = json.loads(out.read_text())
    assert got["pp2"] == pytest.approx(straight.losses[:STOP], abs=1e-5)
    for p in PRECISIONS:  # autocast and the fp16 loss scale pass through the schedule
        one = Trainer(tiny_config(corpus, **BASE, precision={"precision": p}), quiet=True)
        one.fit(STOP)
        assert got[p] == pytest.approx(one.losses, abs=1e-4), p

    resumed = Trainer(tiny_config(corpus, **BASE, checkpoint={"load": save}), quiet=True)
    assert resumed.iteration == STOP
    resumed.fit()
    assert resumed.losses == pytest.approx(straight.losses[STOP:], abs=1e-5)
