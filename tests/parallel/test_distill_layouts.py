"""Distillation under data parallelism: the teacher whole on each rank, the student under ZeRO-3 or DDP over two
ranks, trains to one process's losses (the same global batch)."""

from __future__ import annotations

import json

import pytest
import torch

from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.train.tiny_run import make_corpus, tiny_config

LAYOUTS = {"zero3": {"zero_stage": 3}, "ddp": {"zero_stage": 0}}


def groups(teacher, parallel=None) -> dict:
    return {
        "model": {"num_layers": 1},
        "eval": {"eval_iters": 0},
        "logging": {"log_interval": 1},
        "train": {
            "train_iters": 4,
            "train_micro_batch_size_per_gpu": 1,
            "train_batch_size": 4,
            "train_impl": "distill",
            "distill_teacher": str(teacher),
            "distill_topk": 8,
        },
        "parallel": parallel or {},
    }


@pytest.mark.slow
def test_distillation_under_zero3_and_ddp_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    corpus = make_corpus(tmp_path / "corpus", docs=100)
    teacher = tmp_path / "teacher"
    Trainer(tiny_config(corpus, teacher, train={"train_iters": 10}, eval={"eval_iters": 0}), quiet=True).fit()
    runs = [{"name": n, "groups": groups(teacher, p)} for n, p in LAYOUTS.items()]
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"data": corpus, "runs": runs}))
    torchrun("trainer_worker.py", 2, str(spec), str(out))
    got = json.loads(out.read_text())
    one = Trainer(tiny_config(corpus, **groups(teacher)), quiet=True)
    one.fit()
    assert len(set(one.losses)) > 1
    for name in LAYOUTS:
        assert got[name] == pytest.approx(one.losses, abs=1e-5), name
