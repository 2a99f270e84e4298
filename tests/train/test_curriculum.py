"""Sequence-length curriculum: DeepSpeed's schedule formulas, truncation in GPT-NeoX's sample order, token
accounting, and a resumed run equal to an uninterrupted one bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neox.config import from_dict
from neox.errors import ConfigError
from neox.train.curriculum import Curriculum, seqlen_at, truncate
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config


def train_cfg(**schedule):
    block = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 64, **schedule}
    return from_dict({"seq_length": 64, "curriculum_learning": block}).train


def root_reference(step, total, low, high, unit, degree):
    """DeepSpeed's fixed_root rule written out from its definition."""
    value = math.floor((step / total) ** (1 / degree) * (high - low) + low)
    value = value - value % unit
    first = math.ceil(low / unit) * unit
    return min(max(value, first), high)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_fixed_root_and_linear_follow_the_formula(degree):
    kind = "fixed_linear" if degree == 1 else "fixed_root"
    config = {"total_curriculum_step": 20, "difficulty_step": 8, "root_degree": degree}
    tr = train_cfg(schedule_type=kind, schedule_config=config)
    got = [seqlen_at(tr, s) for s in range(1, 31)]
    assert got == [root_reference(s, 20, 8, 64, 8, degree) for s in range(1, 31)]
    assert got[19:] == [64] * 11 and got == sorted(got) and len(set(got)) > 3


def test_linear_values_by_hand():
    tr = train_cfg(schedule_type="fixed_linear", schedule_config={"total_curriculum_step": 10, "difficulty_step": 8})
    # floor(s/10 * 56 + 8) rounded down to a multiple of 8: s=1 -> 13 -> 8, s=2 -> 19 -> 16, s=5 -> 36 -> 32
    assert [seqlen_at(tr, s) for s in (1, 2, 5, 9, 10, 11)] == [8, 16, 32, 56, 64, 64]


def test_min_not_a_multiple_rounds_up_to_the_first_multiple():
    block = {"min_difficulty": 5, "schedule_type": "fixed_linear"}
    tr = train_cfg(**block, schedule_config={"total_curriculum_step": 100, "difficulty_step": 8})
    assert seqlen_at(tr, 1) == 8  # floor(5.59) = 5 -> 0 as a multiple of 8, raised to 8


def test_fixed_discrete_and_the_stop_at_max_state():
    config = {"difficulty": [16, 64, 32], "max_step": [3, 5]}
    tr = train_cfg(schedule_type="fixed_discrete", schedule_config=config)
    assert [seqlen_at(tr, s) for s in range(1, 9)] == [16, 16, 16, 64, 64, 32, 32, 32]
    c = Curriculum(tr)
    # DeepSpeed stops updating once the maximum is reached, so the later 32 never comes
    assert [c.advance(s) for s in range(1, 9)] == [16, 16, 16, 64, 64, 64, 64, 64]


def test_truncate_cuts_every_per_token_tensor():
    batch = {"tokens": torch.arange(20).view(2, 10), "loss_mask": torch.ones(2, 10), "n": 3}
    out = truncate(batch, 4)
    assert out["tokens"].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]] and out["loss_mask"].shape == (2, 4)
    assert out["n"] == 3


@pytest.mark.parametrize(
    "block,match",
    [
        ({"enabled": True}, "min_difficulty"),
        ({"enabled": True, "min_difficulty": 8, "max_difficulty": 4096}, "max_difficulty"),
        ({"enabled": True, "min_difficulty": 8, "schedule_type": "fixed_root"}, "total_curriculum_step"),
        ({"enabled": True, "min_difficulty": 8, "schedule_type": "cosine"}, "schedule_type"),
        ({"enabled": True, "min_difficulty": 8, "curriculum_type": "vocab"}, "curriculum_type"),
        (
            {
                "enabled": True,
                "min_difficulty": 8,
                "schedule_type": "fixed_discrete",
                "schedule_config": {"difficulty": [8, 16], "max_step": []},
            },
            "max_step",
        ),
        ({"enabled": True, "min_difficulty": 8, "schedule_config": {"total_curriculum_steps": 3}}, "schedule_config"),
    ],
)
def test_bad_blocks_are_one_line_errors(block, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict({"seq_length": 64, "curriculum_learning": block})
    assert "\n" not in str(e.value)


def test_refused_with_pipeline_stages():
    block = {"enabled": True, "min_difficulty": 8, "schedule_config": {"total_curriculum_step": 4}}
    with pytest.raises(ConfigError, match="pipe_parallel_size"):
        from_dict({"seq_length": 64, "num_layers": 2, "pipe_parallel_size": 2, "curriculum_learning": block})


# ---------------------------------------------------------------- through the trainer

CURRICULUM = {
    "curriculum_enabled": True,
    "curriculum_min_difficulty": 8,
    "curriculum_schedule_type": "fixed_linear",
    "curriculum_total_steps": 12,
    "curriculum_difficulty_step": 8,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=150)


def run(corpus, save, stop_at=None, load=None, **train):
    cfg = tiny_config(
        corpus,
        save,
        train={"train_iters": 20, **CURRICULUM, **train},
        eval={"eval_interval": 0, "eval_iters": 0},
        logging={"log_interval": 1},
        checkpoint={"load": load, "save_interval": 10},
    )
    trainer = Trainer(cfg, quiet=True)
    trainer.fit(stop_at)
    return trainer


def test_resume_is_bitwise_and_tokens_are_counted(corpus, tmp_path):
    torch.set_num_threads(1)
    whole = run(corpus, tmp_path / "whole")
    first = run(corpus, tmp_path / "split", stop_at=10)
    second = run(corpus, tmp_path / "split", load=str(tmp_path / "split"))
    assert first.losses + second.losses == whole.losses  # bitwise: floats compared exactly
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "curriculum_seqlen" in r]
    tr = whole.cfg.train
    lengths = [seqlen_at(tr, s) for s in range(1, 21)]
    assert [r["curriculum_seqlen"] for r in train] == lengths
    assert lengths[0] == 8 and lengths[-1] == 32  # seq_length 32: reached at step 12
    batch = whole.global_batch
    assert [r["consumed_tokens"] for r in train] == [batch * sum(lengths[:i]) for i in range(1, 21)]
    assert train[-1]["consumed_samples"] == 20 * batch  # samples advance as without a curriculum
    assert second.consumed_tokens == whole.consumed_tokens


def test_same_samples_as_without_a_curriculum(corpus):
    """Truncation, not re-packing: each step's tokens are the first L tokens of the same samples."""
    torch.set_num_threads(1)
    plain = tiny_config(corpus, train={"train_iters": 3}, eval={"eval_iters": 0})
    short = tiny_config(corpus, train={"train_iters": 3, **CURRICULUM}, eval={"eval_iters": 0})
    a, b = Trainer(plain, quiet=True), Trainer(short, quiet=True)
    it_a, it_b = a._loader(a.train_data, 0, loop=True), b._loader(b.train_data, 0, loop=True)
    for step in range(3):
        full, cut = a._next_step_batches(it_a), b._next_step_batches(it_b)
        b.iteration += 1
        length = seqlen_at(b.cfg.train, step + 1)
        for x, y in zip(full, cut):
            assert y["tokens"].shape[1] == length
            assert torch.equal(x["tokens"][:, :length], y["tokens"])
            assert torch.equal(x["labels"][:, :length], y["labels"])
