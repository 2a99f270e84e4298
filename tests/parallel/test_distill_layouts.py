"""Distillation under data parallelism (the teacher whole on each rank, the student under ZeRO-3 or DDP over two
ranks), under tensor parallelism (teacher and student sharded alike over two ranks, the KL and the top-k
taken across the vocabulary shards) and under pipeline parallelism (the student in two stages, the whole
teacher on the last) trains to one process's losses (the same global batch)."""

from __future__ import annotations

import json

import pytest
import torch

from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.train.tiny_run import make_corpus, tiny_config

LAYOUTS = {"zero3": {"zero_stage": 3}, "ddp": {"zero_stage": 0}}


def groups(teacher, parallel=None, topk=8) -> dict:
    return {
        # the teacher's vocabulary (257 padded to 320 in one process; tp2 would pad to 384)
        "model": {"num_layers": 1, "vocab_size": 320},
        "eval": {"eval_iters": 0},
        "logging": {"log_interval": 1},
        "train": {
            "train_iters": 4,
            "train_micro_batch_size_per_gpu": 1,
            "train_batch_size": 4,
            "train_impl": "distill",
            "distill_teacher": str(teacher),
            "distill_topk": topk,
        },
        "parallel": parallel or {},
    }


def _train(tmp_path, cases: dict, num_layers: int = 1) -> tuple[str, object, dict]:
    """(corpus, teacher, losses per case) of `cases` {name: (parallel, distill_topk)}, one two-rank launch of a
    student of `num_layers`."""
    torch.set_num_threads(1)
    corpus = make_corpus(tmp_path / "corpus", docs=100)
    teacher = tmp_path / "teacher"
    Trainer(tiny_config(corpus, teacher, train={"train_iters": 10}, eval={"eval_iters": 0}), quiet=True).fit()
    runs = [{"name": n, "groups": groups(teacher, p, k)} for n, (p, k) in cases.items()]
    for run in runs:
        run["groups"]["model"]["num_layers"] = num_layers
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"data": corpus, "runs": runs}))
    torchrun("trainer_worker.py", 2, str(spec), str(out))
    return corpus, teacher, json.loads(out.read_text())


@pytest.mark.slow
def test_distillation_under_zero3_and_ddp_matches_one_process(tmp_path):
    corpus, teacher, got = _train(tmp_path, {n: (p, 8) for n, p in LAYOUTS.items()})
    one = Trainer(tiny_config(corpus, **groups(teacher)), quiet=True)
    one.fit()
    assert len(set(one.losses)) > 1
    for name in LAYOUTS:
        assert got[name] == pytest.approx(one.losses, abs=1e-5), name


# (parallel, distill_topk): the top-k KL and the whole-vocabulary KL (with sequence parallelism), 2 tp ranks
TP = {
    "tp2-top8": ({"model_parallel_size": 2}, 8),
    "tp2-sp-full": ({"model_parallel_size": 2, "sequence_parallel": True}, 0),
}


@pytest.mark.slow
def test_distillation_under_tensor_parallelism_matches_one_process(tmp_path):
    corpus, teacher, got = _train(tmp_path, TP)
    for name, (_, k) in TP.items():
        one = Trainer(tiny_config(corpus, **groups(teacher, topk=k)), quiet=True)
        one.fit()
        assert len(set(one.losses)) > 1
        print(name, "tp2", got[name], "one", one.losses)
        assert got[name] == pytest.approx(one.losses, abs=1e-5), name


@pytest.mark.slow
def test_distillation_under_pipeline_parallelism_matches_one_process(tmp_path):
    """pp2 (1F1B, 4 micro-batches, one layer per stage): the whole teacher on the last stage scores its
    micro-batch's tokens there, top-8 and whole-vocabulary KL."""
    pp2 = {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"}
    cases = {"pp2-top8": (pp2, 8), "pp2-full": (pp2, 0)}
    corpus, teacher, got = _train(tmp_path, cases, num_layers=2)
    for name, (_, k) in cases.items():
        g = groups(teacher, topk=k)
        g["model"]["num_layers"] = 2
        one = Trainer(tiny_config(corpus, **g), quiet=True)
        one.fit()
        assert len(set(one.losses)) > 1
        print(name, "pp2", got[name], "one", one.losses)
        assert got[name] == pytest.approx(one.losses, abs=1e-5), name
