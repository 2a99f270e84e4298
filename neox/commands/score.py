"""`neox score RUN --input FILE.jsonl`: rate completions with a reward model (a run trained with train_impl: rm).

Each input line is a pair (prompt, chosen, rejected) or one completion (prompt, completion); each output line
is the input object with `chosen_score` and `rejected_score`, or `score`, added. The score is the one training
optimised (neox.train.preference): the EOD logit at the last completion token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from neox.data.preference import scoring_records
from neox.errors import ConfigError, ensure_dir
from neox.infer.api import load
from neox.kernels.device import resolve_device
from neox.train.preference import score_completions


def register(parser, name):
    parser.add_argument("run", metavar="RUN", help="a reward-model checkpoint (run directory or iter_N folder)")
    parser.add_argument("--input", required=True, action="append", help="JSONL of pairs or completions")
    parser.add_argument("--output", default=None, help="write JSONL here (default: stdout)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="completions per forward pass (default 8)")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: {args.batch_size}; use 1 or more")
    if args.output:
        ensure_dir(Path(args.output).parent, "--output")
    rows = list(scoring_records(args.input))  # malformed lines fail before the model loads
    device = resolve_device(args.device, "--device")
    model, tokenizer = load(args.run, device=device)
    impl = model.cfg.train.train_impl
    if impl != "rm":
        raise ConfigError(
            f"{args.run}: trained with train_impl {impl}; neox score needs a reward model (train_impl: rm)"
        )
    pieces = []
    for _, obj in rows:
        sides = ("chosen", "rejected") if "chosen" in obj else ("completion",)
        pieces.extend((obj["prompt"], obj[s]) for s in sides)
    model.eval()
    with torch.no_grad():
        scores = iter(score_completions(model, tokenizer, pieces, model.cfg.model.seq_length, device, args.batch_size))
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for _, obj in rows:
            if "chosen" in obj:
                obj["chosen_score"], obj["rejected_score"] = next(scores), next(scores)
            else:
                obj["score"] = next(scores)
            out.write(json.dumps(obj) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
