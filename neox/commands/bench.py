"""`neox bench`: neox beside transformers (and the raw tokenizer) on this machine, one table and one JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from neox.bench.run import SECTIONS, Bench, Plan, quick_plan, table
from neox.commands.common import check_positive
from neox.errors import NeoxError


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def register(parser, name):
    parser.add_argument(
        "--quick", action="store_true", help="smallest shapes, short runs, 1 round (a smoke test, not a figure)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every case, engines alternating (3)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--threads", type=int, default=None, help="torch / tokenizer threads per child (all CPUs)")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="training and generation dtype; auto: bf16 on a GPU or a CPU with native bf16",
    )
    parser.add_argument("--shapes", default=None, help="training shapes, e.g. 14m,70m (default 14m,70m,160m,410m)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json for preprocessing (default: a 4096-token BPE trained on the corpus)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    threads = args.threads if args.threads is not None else _default_threads()
    check_positive(threads=threads)
    kw = {"threads": threads, "precision": args.precision, "tokenizer": args.tokenizer}
    kw["only"] = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if args.rounds is not None:
        kw["rounds"] = args.rounds
    if args.shapes:
        kw["train_shapes"] = tuple(s.strip().removeprefix("pythia-") for s in args.shapes.split(","))
    plan = quick_plan(**kw) if args.quick else Plan(**kw)
    bad = [s for s in plan.train_shapes if s not in ("14m", "70m", "160m", "410m")]
    if bad:
        raise NeoxError(f"--shapes: unknown shape(s) {', '.join(bad)}; choose from 14m, 70m, 160m, 410m")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise NeoxError(f"--tokenizer: {args.tokenizer} not found")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)

    def write(report: dict) -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)

    bench = Bench(plan, echo=lambda line: print(line, flush=True), partial=write if out is not None else None)
    report = bench.run()
    print(table(report))
    if out is not None:
        write(report)
        print(f"wrote {out}")
    return 1 if report["errors"] else 0
