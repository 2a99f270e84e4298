"""Under torchrun: train the tiny config with a NaN written into one rank's gradient after the gradients were
reduced (only that rank sees it), and report what every rank decided.

Usage: guards_worker.py SPEC.json OUT_PREFIX; SPEC = {"data": PREFIX, "runs": [{"name", "groups", "rank",
"iteration"}]}. Each rank writes OUT_PREFIX.RANK.json: per run its losses, guard counts and a weights checksum.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.train.tiny_run

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from neox.train.distributed import make_layout, resume_config
from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import strict_collectives
from tests.train.tiny_run import tiny_config


def poison(trainer: Trainer, rank: int, iteration: int) -> None:
    forward_backward = trainer.runner.forward_backward

    def wrapped(micro_batches, loss_scale=1.0):
        loss = forward_backward(micro_batches, loss_scale)
        if dist.get_rank() == rank and trainer.iteration + 1 == iteration:
            grad = next(p.grad for p in trainer.model.parameters() if p.grad is not None)
            grad = grad.to_local() if isinstance(grad, DTensor) else grad  # tensor parallel: this rank's shard
            grad.view(-1)[0] = float("nan")
        return loss

    trainer.runner.forward_backward = wrapped


def checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def main(spec_file: str, out_prefix: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    strict_collectives()
    results = {}
    for run in spec["runs"]:
        cfg = resume_config(tiny_config(spec["data"], **run["groups"]))
        trainer = Trainer(cfg, quiet=True, layout=make_layout(cfg))
        poison(trainer, run["rank"], run["iteration"])
        summary = trainer.fit()
        results[run["name"]] = {
            "losses": trainer.losses,
            "counts": trainer.guards.counts,
            "guard_skipped_steps": summary["guard_skipped_steps"],
            "checksum": checksum(trainer.model),
        }
    Path(f"{out_prefix}.{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
