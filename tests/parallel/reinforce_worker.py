"""Train reinforce (the tiny config of tests/train) under torchrun with the real Trainer, sampling with
tests/train/test_reinforce.py's sampler (neox.infer.generate, the global random stream) and scoring with a toy
reward; rank 0 writes each run's losses and logged mean rewards (its own micro-batches').

Usage: reinforce_worker.py SPEC.json OUT.json; SPEC = {"runs": [{"name", "groups"}]}, run one after another. A run
whose groups set train.reinforce_reward_model samples and scores with neox train's functions instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.train

import torch
import torch.distributed as dist

from neox.commands.train import reinforce_functions, reward_model_for
from neox.train.distributed import make_layout, resume_config
from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import strict_collectives
from tests.train.test_reinforce import sampler
from tests.train.tiny_run import tiny_config


def spread(prompts, completions):
    """A toy reward finer than tests/train's letters (so that each sample moves it): the mean of token % 7 / 6."""
    return [sum(t % 7 for t in y) / (6 * max(1, len(y))) for y in completions]


def main(spec_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    strict_collectives()
    results = {}
    for run in spec["runs"]:
        cfg = resume_config(tiny_config("unused", **run["groups"]))
        layout = make_layout(cfg)
        # with train.reinforce_reward_model: neox train's own sampler and reward model, sharded as the policy
        functions = reinforce_functions(cfg, layout.mesh) if cfg.train.reinforce_reward_model else {}
        functions = functions or {"sampler": sampler, "reward_fn": spread}
        trainer = Trainer(cfg, quiet=True, layout=layout, **functions)
        trainer.fit()
        lines = (Path(cfg.checkpoint.save) / "metrics.jsonl").read_text().splitlines() if dist.get_rank() == 0 else []
        rewards = [r["mean_reward"] for r in map(json.loads, lines) if "mean_reward" in r]
        results[run["name"]] = {"losses": trainer.losses, "rewards": rewards}
        if cfg.train.reinforce_reward_model:  # what neox train builds: the reward model's qkv weight is a DTensor
            model = reward_model_for(cfg.train.reinforce_reward_model, torch.device("cpu"), layout.mesh)[0]
            w = model.layers["0"].attention.query_key_value.weight
            results[run["name"]]["reward_model_shards"] = [tuple(w.shape), tuple(w.to_local().shape)]
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
