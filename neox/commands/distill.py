"""`neox distill CONFIG... --teacher CKPT [-d DIR] [--set KEY=VALUE]`: `neox train` with train_impl distill.

The student is the config's model; the teacher a trained checkpoint with the same tokenizer (neox.train.distill
has the loss). Everything else, torchrun launches included, is `neox train`'s. `--precompute FILE` instead runs
the teacher once over every training sample of the run (one process) and writes its top-distill_topk logits to
FILE, which `--set train.distill_cache=FILE` then trains from without the teacher.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neox.commands import train
from neox.config import load
from neox.errors import NeoxError, ensure_dir
from neox.train.distill import TeacherCache
from neox.train.trainer import Trainer


def register(parser: argparse.ArgumentParser, name: str) -> None:
    train.register(parser, name)
    parser.add_argument(
        "--teacher",
        metavar="CKPT",
        help="teacher checkpoint (run directory or iter_* directory) of the same tokenizer (train.distill_teacher)",
    )
    parser.add_argument(
        "--precompute",
        metavar="FILE",
        help="write the teacher's top-k logits for the run's training samples to FILE, then stop",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    # before the user's --set values: an explicit --set train.distill_alpha=... still applies
    given = [f"train.distill_teacher={args.teacher}"] if args.teacher else []
    args.overrides = ["train.train_impl=distill", *given, *(args.overrides or [])]
    if args.precompute is None:
        return train.run(args)
    return precompute(args)


def precompute(args) -> int:
    if args.nproc not in (None, 1):
        raise NeoxError("neox distill --precompute runs in one process: drop --nproc")
    cfg = load(args.configs, args.overrides, config_dir=args.config_dir, training=True)
    t = cfg.train
    if not t.distill_teacher or t.distill_topk < 1:
        raise NeoxError("neox distill --precompute needs --teacher CKPT and --set train.distill_topk=K (K > 0)")
    t.distill_cache = None  # the teacher itself, not an earlier cache
    cfg.checkpoint.save = cfg.logging.log_dir = None  # nothing of a run is written
    ensure_dir(Path(args.precompute).parent, "--precompute")
    trainer = Trainer(cfg)
    rows = TeacherCache.write(args.precompute, trainer.distiller, trainer.train_batches(), t.distill_topk)
    print(f"wrote the teacher's top-{t.distill_topk} logits of {rows} training samples to {args.precompute}")
    return 0
