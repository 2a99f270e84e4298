"""Train the tiny config of tests/train with the real Trainer under torchrun; rank 0 writes each run's losses.

Usage: trainer_worker.py SPEC.json OUT.json; SPEC = {"data": PREFIX, "runs": [{"name", "groups", "stop_at"}]}.
Runs execute one after another in the same process group (each builds its own mesh).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.train.tiny_run

import torch
import torch.distributed as dist

from neox.train.distributed import make_layout, resume_config
from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import strict_collectives
from tests.train.tiny_run import tiny_config


def main(spec_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    strict_collectives()  # every collective's tensor on a device its group's backend serves
    results = {}
    for run in spec["runs"]:
        cfg = resume_config(tiny_config(spec["data"], **run["groups"]))
        trainer = Trainer(cfg, quiet=True, layout=make_layout(cfg))
        trainer.fit(run.get("stop_at"))
        results[run["name"]] = trainer.losses
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
