"""Activation checkpointing and GPT-NeoX's diagnostics under tp=2 (with and without sequence parallelism), pp=2
and ZeRO-3 over two ranks (the real Trainer, one torchrun launch): each layout, checkpointed, trains to the losses
of one process without checkpointing, and its per-parameter gradient and weight norms and noise scale are those
of the full tensors, equal to one process's. (Each granularity against no checkpointing, bitwise, in one
process: tests/parallel/test_activation_checkpoint.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.train.tiny_run import make_corpus, tiny_config

ITERS = 4
BASE = {
    "model": {"num_layers": 4, "vocab_size": 384},  # the padded vocabulary of tp=2, for one process too
    "eval": {"eval_interval": 0, "eval_iters": 0},
    "train": {"train_iters": ITERS, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4},
}
DIAGNOSTICS = {
    "log_interval": 2,
    "log_grad_norm": True,
    "log_param_norm": True,
    "log_gradient_noise_scale": True,
    "gradient_noise_scale_n_batches": 2,
}
# (layout, checkpointing granularity, blocks per checkpoint): pp2's stages hold two blocks each, so full x2 is
# one checkpoint per stage; ZeRO-3's FSDP units refuse groups of blocks
RUNS = [
    ("tp2", {"model_parallel_size": 2}, "full", 2),
    ("tp2 sp", {"model_parallel_size": 2, "sequence_parallel": True}, "selective_op", 1),
    ("pp2", {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"}, "full", 2),
    ("zero3", {"zero_stage": 3}, "selective_op", 1),
]


def groups(log_dir, parallel=None, kind=None, n=1) -> dict:
    train = dict(BASE["train"])
    if kind is not None:
        train.update(checkpoint_activations=True, checkpoint_granularity=kind, checkpoint_num_layers=n)
    logging = {**DIAGNOSTICS, "log_dir": str(log_dir)}
    return {**BASE, "train": train, "parallel": parallel or {}, "logging": logging}


def logged(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_checkpointing_and_full_tensor_norms_under_layouts(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", docs=200)
    runs = [{"name": name, "groups": groups(tmp_path / name, par, kind, n)} for name, par, kind, n in RUNS]
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"data": corpus, "runs": runs}))
    torchrun("trainer_worker.py", 2, str(spec), str(out))
    got = json.loads(out.read_text())

    torch.set_num_threads(1)
    one = Trainer(tiny_config(corpus, **groups(tmp_path / "one")), quiet=True)  # no checkpointing
    one.fit()
    ref = logged(tmp_path / "one")
    names = [n for n, _ in one.model.named_parameters()]
    assert len(names) > 10 and len(ref) == 2 and len(set(one.losses)) > 1
    for name, *_ in RUNS:
        assert got[name] == pytest.approx(one.losses, abs=1e-5), name
        records = logged(tmp_path / name)
        assert [r["iteration"] for r in records] == [2, 4], name
        for r, want in zip(records, ref):
            for kind in ("gradient_norms", "parameter_norms"):
                for p in names:
                    key = f"{kind}/{p}"
                    assert r[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), (name, key)
            assert r["noise_scale"] == pytest.approx(want["noise_scale"], rel=1e-3), name
