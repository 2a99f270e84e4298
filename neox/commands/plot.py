"""`neox plot RUN [RUN ...]`: loss, validation loss, learning rate, gradient norm and throughput to one PNG."""

from __future__ import annotations

import sys

from neox.commands.common import check_positive
from neox.errors import NeoxError
from neox.train.plot import X_AXES, plot_runs, read_run


def register(parser, name):
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (their metrics.jsonl) or files")
    parser.add_argument("--out", default="plot.png", help="PNG to write (default plot.png)")
    parser.add_argument("--x", choices=list(X_AXES), default="step", help="horizontal axis (default step)")
    parser.add_argument(
        "--smooth", type=int, default=1, help="moving average over this many log lines (default 1: as logged)"
    )
    parser.add_argument("--labels", help="comma-separated legend names, one per RUN (default: directory names)")
    parser.set_defaults(func=run)


def run(args) -> int:
    check_positive(smooth=args.smooth)
    labels = _labels(args)
    runs = []
    for path, label in zip(args.runs, labels, strict=True):
        r, warnings = read_run(path, label)
        for w in warnings:
            print(f"neox plot: warning: {w}", file=sys.stderr)
        runs.append(r)
    out = plot_runs(runs, args.out, x=args.x, smoothing=args.smooth)
    print(f"wrote {out} ({len(runs)} run{'s' * (len(runs) != 1)})")
    return 0


def _labels(args) -> list[str | None]:
    if args.labels is None:
        # directory names, unless two runs share one (runs/a/x vs runs/b/x): then the paths as given
        names = [p.rstrip("/").split("/")[-1] for p in args.runs]
        return [None] * len(names) if len(set(names)) == len(names) else [p.rstrip("/") for p in args.runs]
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != len(args.runs):
        raise NeoxError(f"--labels has {len(labels)} names for {len(args.runs)} runs; give one per RUN")
    return labels
