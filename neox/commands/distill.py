"""`neox distill CONFIG... --teacher CKPT [-d DIR] [--set KEY=VALUE]`: `neox train` with train_impl distill.

The student is the config's model; the teacher a trained checkpoint with the same tokenizer (neox.train.distill
has the loss). Everything else, torchrun launches included, is `neox train`'s.
"""

from __future__ import annotations

import argparse

from neox.commands import train


def register(parser: argparse.ArgumentParser, name: str) -> None:
    train.register(parser, name)
    parser.add_argument(
        "--teacher",
        required=True,
        metavar="CKPT",
        help="teacher checkpoint (run directory or iter_* directory) of the same tokenizer",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    # before the user's --set values: an explicit --set train.distill_alpha=... still applies
    args.overrides = ["train.train_impl=distill", f"train.distill_teacher={args.teacher}", *(args.overrides or [])]
    return train.run(args)
