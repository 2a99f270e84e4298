"""`neox mup coord-check CONFIG... --widths 64,128,256 --steps 5 --out coord.png`: muP's coordinate check."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neox.commands.common import add_config_args, check_positive
from neox.config import load, resolve_vocab
from neox.data.tokenizers import build_tokenizer
from neox.errors import NeoxError, ensure_dir
from neox.train import coord_check as cc


def register(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser(
        "coord-check",
        help="train the config's model at several widths, with muP and without, and plot each layer's "
        "activation scale against width over the first steps",
    )
    add_config_args(check)
    check.add_argument("--widths", required=True, help="comma-separated hidden sizes, e.g. 64,128,256")
    check.add_argument("--steps", type=int, default=5, help="training steps per width (default 5)")
    check.add_argument("--out", default="coord.png", help="PNG to write (default coord.png)")
    check.add_argument("--json", default=None, help="numbers as JSON here (default: --out with .json)")
    check.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    check.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default min(seq_length, 64))")
    check.add_argument("--seed", type=int, default=1234, help="seed of the init and the random batches")
    parser.set_defaults(func=run)


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        widths = []
    if len(widths) < 2 or min(widths) < 1 or len(set(widths)) != len(widths):
        raise NeoxError(f"--widths {text!r}: give two or more different positive hidden sizes, e.g. 64,128,256")
    return sorted(widths)


def run(args: argparse.Namespace) -> int:
    widths = parse_widths(args.widths)
    check_positive(steps=args.steps, batch_size=args.batch_size, seq_length=args.seq_length)
    if cc.plt is None:
        raise NeoxError(cc.PLOT_EXTRA)
    out = Path(args.out)
    numbers = Path(args.json) if args.json else out.with_suffix(".json")
    for path, flag in ((out, "--out"), (numbers, "--json")):
        ensure_dir(path.parent, f"{flag} folder")
    cfg = load(args.configs, args.overrides, args.config_dir)
    if cfg.model.vocab_size is None:
        resolve_vocab(cfg, build_tokenizer(cfg.tokenizer).vocab_size)
    for w in widths:
        cc.width_config(cfg.model, w, True)  # a width the heads do not divide fails before any training
    result = cc.coord_check(cfg, widths, args.steps, args.batch_size, args.seq_length, args.seed)
    cc.plot_coord_check(result, out)
    numbers.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for mode, title in (("mup", "muP"), ("sp", "standard")):
        slopes = ", ".join(f"{k} {v:+.2f}" for k, v in result["slopes"][mode].items())
        print(f"{title}: slope of log mean|x| vs log width at step {args.steps - 1}: {slopes}")
    print(f"wrote {out} and {numbers}")
    return 0
