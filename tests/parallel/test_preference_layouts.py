"""Preference objectives under data, tensor and pipeline parallelism: DPO under ZeRO-3 (reference log-probabilities
computed on every rank, FSDP2 shards) and a reward model under DDP, over two ranks, give one process's losses; so
do DPO (against its reference), KTO and a reward model under tensor parallelism (tp2: vocab-sharded logits,
sequence log-probabilities by the parallel cross entropy, the reward read from the rank holding the EOD column)
and under pipeline parallelism (pp2: the loss on the last stage, the reference through the pipeline)."""

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


def _feedback(directory):
    rows = [
        {"prompt": f"q{i}:", "completion": f" {'yes' if i % 3 else 'no'} {i}", "label": i % 3 > 0} for i in range(16)
    ]
    src = directory / "feedback.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return preprocess_preferences(
        PreferenceOptions([str(src)], str(directory / "feedback"), "unpaired"),
        TokenizerConfig(tokenizer_type="ByteLevelTokenizer"),
    ).outputs


def _data(out) -> dict:
    if "completion" in out:  # unpaired (kto)
        return {
            "data_path": None,
            "train_data_paths": [out["completion"]],
            "label_data_paths": [out["completion_label"]],
            "train_reward_data_paths": [out["reward"]],
        }
    return {
        "data_path": None,
        "pos_train_data_paths": [out["chosen"]],
        "neg_train_data_paths": [out["rejected"]],
        "pos_train_label_data_paths": [out["chosen_label"]],
        "neg_train_label_data_paths": [out["rejected_label"]],
    }


def groups(run, out, impl, parallel=None) -> dict:
    return {
        "data": _data(out),
        # one process pads the byte-level vocabulary (257) to 320, tp2 to 384 (make_vocab_size_divisible_by * tp):
        # the same size for every layout keeps the same model (and softmax)
        "model": {"vocab_size": 320},
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


@pytest.mark.slow
def test_dpo_kto_and_reward_model_under_tensor_parallelism_match_one_process(tmp_path):
    _objectives_match_one_process(tmp_path, "tp2", {"model_parallel_size": 2})


@pytest.mark.slow
def test_dpo_kto_and_reward_model_under_pipeline_parallelism_match_one_process(tmp_path):
    """pp2, 1F1B: the objective's loss runs on the last stage with its micro-batch's reference log-probabilities
    and rewards (a DPO micro-batch's chosen and rejected rows together), the reference computed through the
    pipeline; the tied output layer is the last stage's copy."""
    _objectives_match_one_process(tmp_path, "pp2", {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"})


def _objectives_match_one_process(tmp_path, layout: str, parallel: dict) -> None:
    """dpo, kto and rm under `parallel` over two ranks against one process, 4 steps each."""
    torch.set_num_threads(1)
    data = {"dpo": _pairs(tmp_path), "kto": _feedback(tmp_path)}
    data["rm"] = data["dpo"]

    def run_groups(run, out, impl, parallel=None) -> dict:  # no warm-up and stronger betas: every step moves
        g = groups(run, out, impl, parallel)
        g["schedule"] = {"warmup_iters": 0}
        g["train"].update(dpo_beta=0.5, kto_beta=2.0)
        if impl == "kto":  # one completion per micro-batch makes KTO's batch KL estimate its own reward: loss 0.5
            g["train"]["train_micro_batch_size_per_gpu"] = 2
        return g

    name = {impl: tmp_path / f"{impl}-{layout}" for impl in data}
    runs = [{"name": impl, "groups": run_groups(name[impl], out, impl, parallel)} for impl, out in data.items()]
    spec, result = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"data": "unused", "runs": runs}))
    torchrun("trainer_worker.py", 2, str(spec), str(result))
    got = json.loads(result.read_text())
    for impl, out in data.items():
        one = Trainer(tiny_config("unused", **run_groups(tmp_path / f"{impl}-one", out, impl)), quiet=True)
        one.fit()
        assert len(set(one.losses)) >= ITERS - 1, one.losses  # the losses move (a first step can sit at log 2, 0.5)
        # DPO and KTO scored against the reference each layout computed from the same starting weights
        if impl != "rm":
            ref = torch.load(name[impl] / "reference_logps.pt", weights_only=True)
            assert torch.allclose(ref["train"], one.objective.reference["train"], atol=1e-5), impl
        print(impl, layout, got[impl], "one", one.losses)
        assert got[impl] == pytest.approx(one.losses, abs=1e-5), impl
