"""MoE training throughput: an 8-expert top-2 neox model vs. a dense neox model with the same active
parameters vs. transformers' MixtralForCausalLM of the same shape, in the same run.

    python bench/moe.py                          # 4 blocks, hidden 256, experts of width 704, seq 256, micro 4
    python bench/moe.py --rounds 3 --threads 2 --precision fp32 --json out.json

Every measurement is a child process of its own (neox.bench.run.run_child -> `python -m neox.bench.child`, kind
moe_train; the measuring code is neox/bench/moe.py). Each round runs the engines one after the other, so over
the rounds they alternate A B C A B C and a machine that gets busier or quieter moves them alike; the 1-minute
load average before and after each child is recorded with it. All engines use the same shape, batch, sequence
and precision: --precision auto picks bf16 where the CPU has native bf16 (avx512_bf16 / amx_bf16) or a GPU is
present, as `neox bench` does (neox trains in bf16 autocast; transformers runs under torch.autocast, its usual
bf16 path), otherwise fp32. MFU is against the best matmul rate the machine probe measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from neox.bench.machine import cpu_info, load, versions
from neox.bench.run import NATIVE_BF16, run_child

ENGINES = ("neox-moe", "neox-dense", "hf-mixtral", "hf-mixtral-eager")
DEFAULT_ENGINES = ENGINES[:3]  # hf-mixtral-eager: transformers' loop over experts, on request
SHAPE_KEYS = ("layers", "hidden", "heads", "experts", "top_k", "expert_width", "vocab", "seq", "micro", "dispatch")


def summary(records: list[dict], peak: dict, precision: str) -> list[dict]:
    rows = []
    for engine in ENGINES:
        got = [r for r in records if r.get("engine") == engine and "result" in r]
        if not got:
            continue
        tps = [r["result"]["tokens_per_s"] for r in got]
        fpt = got[0]["result"]["flops_per_token"]
        rows.append(
            {
                "engine": engine,
                "tokens_per_s_best": max(tps),
                "tokens_per_s_median": statistics.median(tps),
                "tokens_per_s_all": tps,
                "mfu_best": max(tps) * fpt / peak[precision] if peak.get(precision) else None,
                "peak_mem_bytes": max(r["result"]["peak_mem_bytes"] or 0 for r in got) or None,
                "load": [[r["load_before"][0], r["load_after"][0]] for r in got],
                **{k: v for k, v in got[0]["result"].items() if k == "hf_experts_implementation"},
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=704)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--dispatch", default="grouped_mm", choices=("grouped_mm", "padded"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per measurement (median taken)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="each round measures every engine once, in turn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated: {', '.join(ENGINES)}")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one measurement may take")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")

    cpu = cpu_info()
    probe = run_child("machine", {"dtypes": ["fp32", "bf16"]}, args.threads, args.timeout)
    if "error" in probe:
        print(f"machine probe failed: {probe['error']}", file=sys.stderr)
        return 1
    gpus = probe["result"]["gpus"]
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if gpus or any(f in cpu["relevant_flags"] for f in NATIVE_BF16) else "fp32"
    print(
        f"{cpu['model']} ({cpu['cpu_count']} CPUs; {' '.join(cpu['relevant_flags'])}), {args.threads} thread(s), "
        f"{precision}, {args.rounds} round(s), load {load()[0]:.1f} at start"
    )
    shape = {k: getattr(args, k) for k in SHAPE_KEYS}
    spec = dict(precision=precision, steps=args.steps, warmup=args.warmup, **shape)
    records, probes = [], [probe]
    for rnd in range(args.rounds):
        if rnd:
            probes.append(run_child("machine", {"dtypes": [precision]}, args.threads, args.timeout))
        for engine in engines:
            r = run_child("moe_train", {**spec, "engine": engine}, args.threads, args.timeout, engine=engine, round=rnd)
            records.append(r)
            lb, la = r["load_before"][0], r["load_after"][0]
            if "error" in r:
                print(f"  round {rnd + 1} {engine:>10}: failed: {r['error']}")
            else:
                print(
                    f"  round {rnd + 1} {engine:>10}: {r['result']['tokens_per_s']:8.0f} tok/s  load {lb:.1f}->{la:.1f}"
                )
    peak = {}
    for pr in probes:
        for d, v in pr.get("result", {}).get("matmul_flops", {}).items():
            peak[d] = max(peak.get(d, 0.0), v)
    rows = summary(records, peak, precision)
    print("\n| engine | best tok/s | median tok/s | MFU (best) | load before->after |\n|---|---|---|---|---|")
    for row in rows:
        loads = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in row["load"])
        mfu = f"{row['mfu_best']:.1%}" if row["mfu_best"] is not None else "-"
        name = row["engine"] + (f" ({row['hf_experts_implementation']})" if "hf_experts_implementation" in row else "")
        print(f"| {name} | {row['tokens_per_s_best']:.0f} | {row['tokens_per_s_median']:.0f} | {mfu} | {loads} |")
    by = {row["engine"]: row for row in rows}
    ratios = {}
    for other in ("hf-mixtral", "hf-mixtral-eager", "neox-dense"):
        if "neox-moe" in by and other in by:
            best = by["neox-moe"]["tokens_per_s_best"] / by[other]["tokens_per_s_best"]
            med = by["neox-moe"]["tokens_per_s_median"] / by[other]["tokens_per_s_median"]
            ratios[f"neox-moe/{other}"] = {"best": best, "median": med}
            print(f"neox MoE / {other}: {best:.2f}x (best), {med:.2f}x (median)")
    if args.json:
        out = {
            "cpu": cpu,
            "gpus": gpus,
            "versions": versions(),
            "precision": precision,
            "threads": args.threads,
            "shape": shape,
            "matmul_flops_peak": peak,
            "rows": rows,
            "ratios": ratios,
            "records": records,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
