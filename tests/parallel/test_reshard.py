"""Resharding: a checkpoint saved under dp2 x tp2 (ZeRO 3 + sequence parallel, async save on its own group)
resumes under tp2, ZeRO-1 dp2 (with activation checkpointing) and one process, and each continues with the
losses of the uninterrupted single-process run (real Trainer)."""

from __future__ import annotations

import json

import pytest
import torch

from neox.train.checkpoint import consolidate
from neox.train.distributed import resume_config
from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.train.tiny_run import make_corpus, tiny_config

ITERS, STOP = 6, 3
# global batch 4 in every layout (accumulation makes up for fewer data-parallel ranks). The vocabulary is left
# to padding: 257 byte-level tokens pad to 384 at tp 2 (multiple of 64 * 2) but to 320 at tp 1, so resuming
# at tp 1 relies on resume_config keeping the checkpoint's size. Runs from scratch at tp 1 pin 384 to match.
BASE = {
    "eval": {"eval_iters": 0},
    "train": {"train_iters": ITERS, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4},
}
SAME_VOCAB = {"vocab_size": 384}


def groups(**extra):
    out = json.loads(json.dumps(BASE))
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=200)


def run_here(prefix, stop_at=None, **extra):
    torch.set_num_threads(1)
    t = Trainer(resume_config(tiny_config(prefix, **groups(**extra))), quiet=True)
    t.fit(stop_at)
    return t.losses


def launch(nproc, prefix, runs, tmp_path, tag):
    spec, out = tmp_path / f"{tag}.json", tmp_path / f"{tag}-out.json"
    spec.write_text(json.dumps({"data": prefix, "runs": runs}))
    torchrun("trainer_worker.py", nproc, str(spec), str(out))
    return json.loads(out.read_text())


@pytest.mark.slow
def test_save_under_one_layout_resume_under_three_others(corpus, tmp_path):
    straight = run_here(corpus, model=SAME_VOCAB)
    assert len(straight) == ITERS and straight[-1] != straight[0]

    save = str(tmp_path / "run")
    first = launch(
        4,
        corpus,
        [
            {
                "name": "dp2xtp2",
                "stop_at": STOP,
                "groups": groups(
                    parallel={"model_parallel_size": 2, "zero_stage": 3, "sequence_parallel": True},
                    checkpoint={"save": save, "save_interval": STOP, "async_save": True},
                ),
            }
        ],
        tmp_path,
        "save",
    )["dp2xtp2"]
    assert first == pytest.approx(straight[:STOP], abs=1e-5)

    # resume in one process; the sharded checkpoint as one file holds exactly the weights it loaded
    torch.set_num_threads(1)
    single = Trainer(resume_config(tiny_config(corpus, **groups(checkpoint={"load": save}))), quiet=True)
    consolidate(save, tmp_path / "model.pt")
    full = torch.load(tmp_path / "model.pt")["model"]
    assert full.keys() == single.model.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in single.model.state_dict().items())
    single.fit()

    resumed = launch(
        2,
        corpus,
        [
            {"name": "tp2", "groups": groups(parallel={"model_parallel_size": 2}, checkpoint={"load": save})},
            {
                "name": "zero1 dp2 + activation checkpointing",
                "groups": groups(
                    parallel={"zero_stage": 1}, checkpoint={"load": save}, train={"checkpoint_activations": True}
                ),
            },
            # not a resume: fp16 loss scaling unscales a mix of plain and DTensor gradients (TP without SP)
            {
                "name": "tp2 fp16",
                "groups": groups(parallel={"model_parallel_size": 2}, precision={"precision": "fp16"}),
            },
        ],
        tmp_path,
        "load",
    )
    fp16 = resumed.pop("tp2 fp16")
    assert fp16 == pytest.approx(run_here(corpus, model=SAME_VOCAB, precision={"precision": "fp16"}), abs=1e-2)
    # and fp16 really ran: the same run in fp32 (`straight`) gives other losses
    assert max(abs(a - b) for a, b in zip(fp16, straight)) > 1e-4
    resumed["single process"] = single.losses
    for name, losses in resumed.items():
        assert losses == pytest.approx(straight[STOP:], abs=1e-5), name
