"""Online REINFORCE under data and tensor parallelism, over two ranks (gloo): ZeRO-3 (the policy sampled while
FSDP2-sharded, its ranks stepping together until all their rows stop) gives DDP's losses and logged rewards, and
tensor parallelism (vocab-sharded logits, the tp ranks on rank 0's tokens, the reference sharded as the policy)
gives one process's.

Sampling is seeded, not greedy (reinforce refuses temperature 0): each call draws from a generator seeded by its
prompts (tests/parallel/reinforce_worker.py), so the draws do not depend on how many steps a layout runs past its
rows' stops. SGD rather than Adam: Adam divides near-zero gradients by their own size, which turns rounding
differences between layouts into whole learning-rate steps and, a step later, into different samples."""

from __future__ import annotations

import json

import pytest
import torch

from neox.commands.train import reinforce_functions
from neox.errors import ConfigError
from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.parallel.reinforce_worker import spread
from tests.parallel.test_preference_layouts import _pairs
from tests.parallel.test_preference_layouts import groups as preference_groups
from tests.train.test_reinforce import _prompts, sampler
from tests.train.tiny_run import tiny_config

ITERS = 4


def groups(run, prompts, parallel=None, reward_model=None) -> dict:
    g = {
        "data": {"data_path": None, "train_data_paths": [prompts]},
        # one process pads the byte-level vocabulary to 320, tp2 to 384: the same size keeps the same model
        "model": {"vocab_size": 320},
        "train": {
            "train_impl": "reinforce",
            "train_iters": ITERS,
            "train_micro_batch_size_per_gpu": 2,
            "reinforce_max_new_tokens": 5,
            "reinforce_samples_per_prompt": 2,
            "kl_div_beta": 0.1,
        },
        "optimizer": {"type": "sgd", "lr": 0.5, "weight_decay": 0.0},
        "schedule": {"lr_decay_style": "constant", "warmup_iters": 0},
        "eval": {"eval_iters": 0},
        "logging": {"log_interval": 1},
        "checkpoint": {"save": str(run), "save_interval": ITERS},
        "parallel": parallel or {},
    }
    if reward_model is not None:  # neox train's sampler and reward (neox.commands.train.reinforce_functions)
        g["train"]["reinforce_reward_model"] = str(reward_model)
    return g


def _launch(tmp_path, runs: dict, prompts, reward_model=None) -> dict:
    spec = [{"name": name, "groups": groups(tmp_path / name, prompts, p, reward_model)} for name, p in runs.items()]
    (tmp_path / "spec.json").write_text(json.dumps({"runs": spec}))
    torchrun("reinforce_worker.py", 2, str(tmp_path / "spec.json"), str(tmp_path / "out.json"))
    return json.loads((tmp_path / "out.json").read_text())


def test_reinforce_runs_under_zero_and_tensor_parallelism_not_pipeline_stages(tmp_path):
    prompts = _prompts(tmp_path)
    for parallel in ({"zero_stage": 3}, {"zero_stage": 1}, {"model_parallel_size": 2}):
        assert tiny_config("unused", **groups(tmp_path / "run", prompts, parallel)).train.train_impl == "reinforce"
    with pytest.raises(
        ConfigError, match="reinforce runs in one process.*not with pipeline stages.*pipe_parallel_size"
    ):
        tiny_config("unused", **groups(tmp_path / "run", prompts, {"pipe_parallel_size": 2}))


def _moved(losses) -> bool:
    return len({round(x, 6) for x in losses}) == len(losses)


@pytest.mark.slow
def test_reinforce_under_zero3_matches_ddp(tmp_path):
    torch.set_num_threads(1)
    got = _launch(tmp_path, {"ddp": {"zero_stage": 0}, "zero3": {"zero_stage": 3}}, _prompts(tmp_path))
    ddp, zero3 = got["ddp"], got["zero3"]
    print("ddp", ddp, "zero3", zero3)
    assert _moved(ddp["losses"]) and len(ddp["rewards"]) == ITERS
    assert zero3["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    assert zero3["rewards"] == pytest.approx(ddp["rewards"], abs=1e-5)
    saved = [torch.load(tmp_path / name / "reference_model.pt", weights_only=True) for name in ("ddp", "zero3")]
    assert saved[0].keys() == saved[1].keys()  # whole weights, whatever the layout
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


@pytest.mark.slow
def test_reinforce_under_tensor_parallelism_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    prompts = _prompts(tmp_path)
    got = _launch(tmp_path, {"tp2": {"model_parallel_size": 2}}, prompts)["tp2"]
    run = tmp_path / "one"
    one = Trainer(tiny_config("unused", **groups(run, prompts)), quiet=True, sampler=sampler, reward_fn=spread)
    one.fit()
    rewards = [r["mean_reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    print("tp2", got, "one", one.losses, rewards)
    assert _moved(one.losses)
    assert got["losses"] == pytest.approx(one.losses, abs=1e-5)
    assert got["rewards"] == pytest.approx(rewards, abs=1e-5)
    ref = torch.load(tmp_path / "tp2" / "reference_model.pt", weights_only=True)
    start = torch.load(run / "reference_model.pt", weights_only=True)
    assert all(torch.allclose(ref[k], start[k]) for k in start)  # the whole starting weights, gathered


@pytest.mark.slow
def test_sampling_a_zero3_sharded_model_keeps_its_ranks_in_step(tmp_path):
    """Rank 0's row stops at its first token, rank 1's runs all six: rank 0 steps on (FSDP2 gathers weights in
    every forward) drawing nothing, so both ranks' tokens and random streams equal the whole model's alone."""
    torch.set_num_threads(1)
    torchrun("generate_lockstep_worker.py", 2, str(tmp_path / "out.json"))
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["rank0"]["alone"]["reason"] == "eod" and got["rank0"]["alone"]["tokens"] == []
    assert got["rank1"]["alone"]["reason"] == "length" and len(got["rank1"]["alone"]["tokens"]) == 6
    for rank in ("rank0", "rank1"):
        assert got[rank]["sharded"] == got[rank]["alone"], rank
        assert got[rank]["again"] == got[rank]["alone"], rank


@pytest.mark.slow
def test_reinforce_with_a_reward_model_under_tensor_parallelism_matches_one_process(tmp_path):
    """neox train's sampler and reward: the reward model (a train_impl: rm checkpoint) sharded over the two
    tensor-parallel ranks as the policy, scoring rank 0's tokens on both."""
    torch.set_num_threads(1)
    rm = Trainer(tiny_config("unused", **preference_groups(tmp_path / "rm", _pairs(tmp_path), "rm")), quiet=True)
    rm.fit()
    prompts = _prompts(tmp_path)
    got = _launch(tmp_path, {"tp2": {"model_parallel_size": 2}}, prompts, tmp_path / "rm")["tp2"]
    run = tmp_path / "one"
    cfg = tiny_config("unused", **groups(run, prompts, reward_model=tmp_path / "rm"))
    one = Trainer(cfg, quiet=True, **reinforce_functions(cfg))
    one.fit()
    rewards = [r["mean_reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    print("tp2", got, "one", one.losses, rewards)
    assert got["reward_model_shards"] == [[96, 32], [48, 32]]  # qkv: whole, this rank's half
    assert _moved(one.losses) and len(set(rewards)) > 1
    assert got["losses"] == pytest.approx(one.losses, abs=1e-5)
    assert got["rewards"] == pytest.approx(rewards, abs=1e-5)


@pytest.mark.slow
def test_reinforce_resumed_under_zero3_continues_as_the_unbroken_run(tmp_path):
    """Two steps, a save, then a resume to four under ZeRO-3: the reference comes back from reference_model.pt
    (whole weights, handed to every rank), the random streams from the checkpoint, and steps 3-4 repeat the
    unbroken run's."""
    torch.set_num_threads(1)
    prompts, zero3 = _prompts(tmp_path), {"zero_stage": 3}
    first = groups(tmp_path / "broken", prompts, zero3)
    first["train"]["train_iters"], first["checkpoint"]["save_interval"] = 2, 2
    resumed = groups(tmp_path / "broken", prompts, zero3)
    resumed["checkpoint"]["load"] = str(tmp_path / "broken")
    spec = [
        {"name": "unbroken", "groups": groups(tmp_path / "unbroken", prompts, zero3)},
        {"name": "first", "groups": first},
        {"name": "resumed", "groups": resumed},
    ]
    (tmp_path / "spec.json").write_text(json.dumps({"runs": spec}))
    torchrun("reinforce_worker.py", 2, str(tmp_path / "spec.json"), str(tmp_path / "out.json"))
    got = json.loads((tmp_path / "out.json").read_text())
    print({k: v["losses"] for k, v in got.items()})
    assert got["first"]["losses"] == pytest.approx(got["unbroken"]["losses"][:2], abs=1e-5)
    assert got["resumed"]["losses"] == pytest.approx(got["unbroken"]["losses"][2:], abs=1e-5)
