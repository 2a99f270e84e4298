"""Preference objectives under data parallelism: DPO under ZeRO-3 (reference log-probabilities computed on every
rank, FSDP2 shards) and a reward model under DDP, over two ranks, give one process's losses."""

from __future__ import annotations

import json

import pytest
import torch

from neox.config.schema import TokenizerConfig
from neox.data.preference import PreferenceOptions, preprocess_preferences
from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.train.tiny_run import tiny_config

ITERS = 4
CASES = {"dpo": {"zero_stage": 3}, "rm": {"zero_stage": 0}}


def _pairs(directory):
    rows = [{"prompt": f"q{i}:", "chosen": f" yes {i}", "rejected": f" no {i * 7 % 5}"} for i in range(16)]
    src = directory / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return preprocess_preferences(
        PreferenceOptions([str(src)], str(directory / "pairs")), TokenizerConfig(tokenizer_type="ByteLevelTokenizer")
    ).outputs


def groups(run, out, impl, parallel=None) -> dict:
    return {
        "data": {
            "data_path": None,
            "pos_train_data_paths": [out["chosen"]],
            "neg_train_data_paths": [out["rejected"]],
            "pos_train_label_data_paths": [out["chosen_label"]],
            "neg_train_label_data_paths": [out["rejected_label"]],
        },
        "optimizer": {"lr": 1e-2},
        "eval": {"eval_iters": 0},
        "logging": {"log_interval": 1},
        "train": {"train_impl": impl, "train_iters": ITERS, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4},
        "checkpoint": {"save": str(run), "save_interval": ITERS},
        "parallel": parallel or {},
    }


@pytest.mark.slow
def test_dpo_under_zero3_and_reward_model_under_ddp_match_one_process(tmp_path):
    torch.set_num_threads(1)
    out = _pairs(tmp_path)
    runs = [{"name": impl, "groups": groups(tmp_path / f"{impl}-dp2", out, impl, p)} for impl, p in CASES.items()]
    spec, result = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"data": "unused", "runs": runs}))
    torchrun("trainer_worker.py", 2, str(spec), str(result))
    got = json.loads(result.read_text())
    for impl in CASES:
        one = Trainer(tiny_config("unused", **groups(tmp_path / f"{impl}-one", out, impl)), quiet=True)
        one.fit()
        assert len(set(one.losses)) > 1
        assert got[impl] == pytest.approx(one.losses, abs=1e-5), impl
