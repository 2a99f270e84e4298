"""The real Trainer under pipeline parallelism (neox.parallel.parallelize picks the pipeline runner): pp=2 with
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
BASE = {
    "model": {"vocab_size": 384, "num_layers": 4},
    "eval": {"eval_interval": 2, "eval_iters": 1},
    "train": {"train_iters": ITERS, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4},
}


@pytest.mark.slow
def test_trainer_pp2_matches_one_process_and_resumes_there(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", docs=200)
    torch.set_num_threads(1)
    straight = Trainer(tiny_config(corpus, **BASE), quiet=True)
    straight.fit()
    assert len(straight.losses) == ITERS and straight.losses[-1] != straight.losses[0]

    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    layouts = {
        "pp2": {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"},
        # two stages per rank: the optimizer and checkpoints see the rank's view of both
        "pp2 interleaved": {"pipe_parallel_size": 2, "pipe_schedule": "interleaved_1f1b", "pipe_stages_per_rank": 2},
    }
    saved = [
        {
            "name": name,
            "stop_at": STOP,
            "groups": {**BASE, "parallel": par, "checkpoint": {"save": str(tmp_path / name), "save_interval": STOP}},
        }
        for name, par in layouts.items()
    ]
    low = [
        {"name": p, "stop_at": STOP, "groups": {**BASE, "parallel": layouts["pp2"], "precision": {"precision": p}}}
        for p in PRECISIONS
    ]
    spec.write_text(json.dumps({"data": corpus, "runs": saved + low}))
    torchrun("trainer_worker.py", 2, str(spec), str(out))
    got = json.loads(out.read_text())
    for name in layouts:
        assert got[name] == pytest.approx(straight.losses[:STOP], abs=1e-5), name
    for p in PRECISIONS:  # autocast and the fp16 loss scale pass through the schedule
        one = Trainer(tiny_config(corpus, **BASE, precision={"precision": p}), quiet=True)
        one.fit(STOP)
        assert got[p] == pytest.approx(one.losses, abs=1e-4), p

    for name in layouts:
        resumed = Trainer(tiny_config(corpus, **BASE, checkpoint={"load": str(tmp_path / name)}), quiet=True)
        assert resumed.iteration == STOP
        resumed.fit()
        assert resumed.losses == pytest.approx(straight.losses[STOP:], abs=1e-5), name
