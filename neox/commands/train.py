"""`neox train CONFIG... [-d DIR] [--set KEY=VALUE]`: train or fine-tune from GPT-NeoX-style YAML configs.

With `--nproc N` (or a hostfile / Slurm step) the command re-launches itself under torchrun and every worker
trains its part of the layout in `parallel`; see neox.parallel.launch.
"""

from __future__ import annotations

import argparse
import sys

from neox.commands.common import add_config_args
from neox.config import load, resolve_batch
from neox.parallel import launch, pipeline
from neox.parallel.mesh import ParallelDims
from neox.parallel.runtime import resume_config, trainer_args
from neox.train.trainer import Trainer


def register(parser: argparse.ArgumentParser, name: str) -> None:
    add_config_args(parser)
    launch.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    cfg = load(args.configs, args.overrides, config_dir=args.config_dir, training=True)
    source = ", ".join(args.configs)
    code = launch.launch(args, sys.argv[1:], validate=lambda world: check_layout(cfg, world, source))
    if code is not None:
        return code
    cfg = resume_config(cfg)
    trainer = Trainer(cfg, **trainer_args(cfg, source))
    summary = trainer.fit()
    if not trainer.quiet:
        parts = [f"{k} {v:.4f}" for k, v in summary.items() if k.endswith(("loss", "ppl"))]
        print(f"done: iteration {trainer.iteration}" + (" | " + " | ".join(parts) if parts else ""))
    return 0


def check_layout(cfg, world_size: int, source: str) -> None:
    """Everything about the parallel layout that can be wrong, for `world_size` processes, before any starts:
    the mesh, the batch triple at that data-parallel size, and the pipeline schedule's constraints (which
    would otherwise fail on every rank at Trainer start)."""
    dims = ParallelDims.from_config(cfg.parallel, world_size, cfg.model, source)
    accum = resolve_batch(cfg, dims.dp)[1]
    if cfg.parallel.pipe_parallel_size > 1:
        pipeline.validate(cfg.parallel, cfg.model.num_layers, accum, source)
