"""The benchmark's plan, its rounds and its table: every measurement is a child process (neox.bench.child).

Each round runs every case's engines one after the other (neox, then the reference: transformers or the raw
tokenizer), so over several rounds the two sides alternate A B A B and a machine that gets busier or quieter
moves both alike. The 1-minute load average before and after each child is recorded with it. The matmul peak
(per dtype, for MFU) is measured in each round too and the best of the run is used. This module imports no
torch: `neox bench` itself stays light and everything heavy happens in the children.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from neox.bench.machine import cpu_info, load, versions
from neox.errors import NeoxError

SECTIONS = ("train", "generate", "preprocess", "startup")
CHILD_MARK = "NEOX_BENCH_RESULT "
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


@dataclass
class Plan:
    rounds: int = 3
    threads: int = 1
    only: tuple = SECTIONS
    precision: str = "auto"  # fp32, bf16 or auto (bf16 on a GPU or a CPU with native bf16)
    train_shapes: tuple = ("14m", "70m", "160m", "410m")
    seq: int = 512
    micro: int = 4
    steps: int = 3
    warmup: int = 1
    gen_shapes: tuple = ("70m", "160m")
    gen_compiled: bool = True  # measure the compiled decode step too (its compile is the warm-up, untimed)
    batches: tuple = (1, 8)
    prompt_len: int = 32
    new_tokens: int = 128
    trials: int = 2
    preprocess_bytes: int = 4 << 20
    tokenizer: str | None = None
    timeout_s: float = 1800.0
    quick: bool = False
    resolved: dict = field(default_factory=dict)  # what "auto" became


def quick_plan(**overrides) -> Plan:
    """The smallest shapes and one round: what the test runs (a minute on two busy cores)."""
    base = dict(
        rounds=1,
        train_shapes=("14m",),
        seq=128,
        micro=2,
        steps=1,
        warmup=0,  # so the one timed step is the first: a smoke figure
        gen_shapes=("14m",),
        gen_compiled=False,  # a compile takes longer than the rest of the quick run
        prompt_len=8,
        new_tokens=8,
        trials=1,
        preprocess_bytes=64 << 10,
        quick=True,
    )
    return Plan(**{**base, **overrides})


def run_child(kind: str, args: dict, threads: int, timeout: float, **extra) -> dict:
    """One child: its spec, result (or error), wall seconds and the load average before and after."""
    spec = {"kind": kind, "args": args, "threads": threads, **extra}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    record = {"kind": kind, "args": args, **extra, "load_before": load()}
    launched = time.time()
    if kind == "train":  # time to first step counts from here, interpreter start included
        spec["args"] = {**args, "launched_at": launched}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "neox.bench.child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        lines = [x for x in out.stdout.splitlines() if x.startswith(CHILD_MARK)]
        if out.returncode == 0 and lines:
            record["result"] = json.loads(lines[-1].removeprefix(CHILD_MARK))
        else:
            tail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
            record["error"] = tail[-300:]
    except subprocess.TimeoutExpired:
        record["error"] = f"timed out after {timeout:.0f} s"
    record["wall_s"] = time.time() - launched
    record["load_after"] = load()
    return record


def has_transformers() -> bool:
    """Whether the reference engine can run (looked up without importing it: this module stays light)."""
    return importlib.util.find_spec("transformers") is not None


def _precision(plan: Plan, cpu: dict, gpus: list) -> str:
    if plan.precision != "auto":
        return plan.precision
    return "bf16" if gpus or any(f in cpu["relevant_flags"] for f in NATIVE_BF16) else "fp32"


class Bench:
    def __init__(self, plan: Plan, echo=print, partial=None):
        unknown = set(plan.only) - set(SECTIONS)
        if unknown:
            raise NeoxError(
                f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
            )
        if plan.rounds < 1:
            raise NeoxError(f"--rounds must be at least 1, not {plan.rounds}")
        self.plan, self.echo = plan, echo
        self.partial = partial  # called with the report so far after each measurement (a long run keeps it)
        self.records: list[dict] = []
        self.work = tempfile.mkdtemp(prefix="neox-bench-")

    def child(self, kind: str, args: dict, **extra) -> dict:
        r = run_child(kind, args, self.plan.threads, self.plan.timeout_s, **extra)
        self.records.append(r)
        if "error" in r:
            self.echo(f"  {kind} {extra.get('engine', '')} failed: {r['error']}")
        elif "engine" in extra:  # progress: a measurement takes from seconds to minutes
            res = r["result"]
            rates = [res["tokens_per_s"]] if "tokens_per_s" in res else [v.get("tokens_per_s") for v in res.values()]
            figures = ", ".join(f"{x:,.0f} tokens/s" for x in rates if isinstance(x, float)) or "done"
            self.echo(
                f"  {kind} {extra.get('case', '')} {extra['engine']}: {figures} "
                f"({r['wall_s']:.0f} s, load {r['load_before'][0]:.1f}→{r['load_after'][0]:.1f})"
            )
        return r

    def cases(self, precision: str, prep: dict | None) -> list[tuple[str, str, list[tuple[str, str, dict, dict]]]]:
        """(section, case name, [(engine, child kind, args, extra)]) in the order each round runs them."""
        p, out = self.plan, []
        hf_precision = "fp32" if precision == "fp32" else "bf16-autocast"
        if "train" in p.only:
            for shape in p.train_shapes:
                common = dict(shape=shape, seq=p.seq, micro=p.micro, steps=p.steps, warmup=p.warmup)
                out.append(
                    (
                        "train",
                        f"pythia-{shape}",
                        [
                            ("neox", "train", {**common, "engine": "neox", "precision": precision}, {}),
                            ("hf", "train", {**common, "engine": "hf", "precision": hf_precision}, {}),
                        ],
                    )
                )
        if "generate" in p.only:
            for shape in p.gen_shapes:
                common = dict(
                    shape=shape, dtype=precision, prompt_len=p.prompt_len, new_tokens=p.new_tokens, trials=p.trials
                )
                extra = {"batches": list(p.batches)}
                engines = [
                    (engine, "generate", {**common, "engine": engine}, extra)
                    for engine in ("neox", "neox-compiled", "hf")
                    if (engine != "hf" or has_transformers()) and (engine != "neox-compiled" or p.gen_compiled)
                ]
                out.append(("generate", f"pythia-{shape}", engines))
        if prep is not None:
            common = dict(corpus=prep["corpus"], tokenizer=prep["tokenizer"], workers=p.threads)
            out.append(
                (
                    "preprocess",
                    "stdlib",
                    [
                        ("neox", "preprocess", {**common, "engine": "neox"}, {}),
                        ("raw", "preprocess", {**common, "engine": "raw"}, {}),
                    ],
                )
            )
        if "startup" in p.only:
            out.append(("startup", "tiny-cpu", [("neox", "startup", {"work": self.work}, {})]))
        return out

    def run(self) -> dict:
        """Every round of every case; the work directory (synthetic corpora, start-up runs) is removed after."""
        try:
            return self._run()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> dict:
        p = self.plan
        cpu = cpu_info()
        self.echo(
            f"neox bench: {cpu['model']} ({cpu['cpu_count']} CPUs; {' '.join(cpu['relevant_flags']) or 'no AVX2'}), "
            f"{p.threads} threads, {p.rounds} round(s), load {load()[0]:.1f} at start"
        )
        dtypes = ["fp32", "bf16"] if p.precision == "auto" else [p.precision]
        first = self.child("machine", {"dtypes": dtypes})
        if "error" in first:
            raise NeoxError(f"the machine probe failed: {first['error']}")
        gpus = first["result"]["gpus"]
        precision = _precision(p, cpu, gpus)
        p.resolved = {"precision": precision, "device": first["result"]["device"]}
        prep = None
        if "preprocess" in p.only:
            r = self.child(
                "preprocess_prepare", {"out_dir": self.work, "max_bytes": p.preprocess_bytes, "tokenizer": p.tokenizer}
            )
            prep = r.get("result")
        cases = self.cases(precision, prep)
        if "generate" in p.only and not has_transformers():
            self.echo(
                "generation: transformers is not installed, so only neox's rows are measured (pip install transformers)"
            )
        for rnd in range(p.rounds):
            self.echo(f"round {rnd + 1}/{p.rounds} (load {load()[0]:.1f})")
            if rnd:  # the first probe serves round one
                self.child("machine", {"dtypes": [precision]}, round=rnd)
            for section, name, engines in cases:
                for engine, kind, args, extra in engines:
                    self.child(kind, args, section=section, case=name, engine=engine, round=rnd, **extra)
                    if self.partial is not None:
                        self.partial(self.report(cpu, gpus, precision, complete=False))
        return self.report(cpu, gpus, precision)

    # ------------------------------------------------------------------ summary
    def peak(self, dtype: str) -> float:
        rates = [
            r["result"]["matmul_flops"].get(dtype, 0.0)
            for r in self.records
            if r["kind"] == "machine" and "result" in r
        ]
        return max(rates, default=0.0)

    def rows(self, section: str) -> list[dict]:
        """One row per (case, engine, point): best and median tokens/s over rounds, memory, load."""
        groups: dict[tuple, list[tuple[dict, dict]]] = {}
        for r in self.records:
            if r.get("section") != section or "result" not in r or section == "startup":
                continue
            points = r["result"].items() if section == "generate" else [("", r["result"])]
            for point, res in points:
                groups.setdefault((r["case"], point, r["engine"]), []).append((r, res))
        rows = []
        for (case, point, engine), items in groups.items():
            tps = [res["tokens_per_s"] for _, res in items]
            row = {
                "case": case,
                "point": point,
                "engine": engine,
                "tokens_per_s_best": max(tps),
                "tokens_per_s_median": statistics.median(tps),
                "tokens_per_s_all": tps,
                "peak_mem_bytes": max((res.get("peak_mem_bytes") or 0) for _, res in items) or None,
                "load": [[r["load_before"][0], r["load_after"][0]] for r, _ in items],
            }
            firsts = [res["first_step_s"] for _, res in items if res.get("first_step_s") is not None]
            row["first_step_s"] = min(firsts) if firsts else None
            if section == "train":
                peak = self.peak(self.plan.resolved["precision"])
                row["mfu"] = max(tps) * items[0][1]["flops_per_token"] / peak if peak else None
            rows.append(row)
        order = {case: i for i, case in enumerate(dict.fromkeys(c for c, _, _ in groups))}
        rows.sort(
            key=lambda r: (order[r["case"]], int(r["point"] or 0), not r["engine"].startswith("neox"), r["engine"])
        )
        for row in rows:  # ratio: neox's best (eager or compiled) over the reference's best at the same point
            if row["engine"].startswith("neox"):
                ref = [
                    o
                    for o in rows
                    if o["case"] == row["case"] and o["point"] == row["point"] and not o["engine"].startswith("neox")
                ]
                row["ratio"] = row["tokens_per_s_best"] / ref[0]["tokens_per_s_best"] if ref else None
        return rows

    def startup(self) -> dict | None:
        runs = [r["result"] for r in self.records if r.get("section") == "startup" and "result" in r]
        if not runs:
            return None
        out = {}
        for key in ("help", "config_show", "train_first_step"):
            out[key] = {
                "seconds_best": min(x[key]["seconds"] for x in runs),
                "seconds_all": [x[key]["seconds"] for x in runs],
                "rc": [x[key]["rc"] for x in runs],
            }
            if key != "train_first_step":
                out[key]["imports_torch"] = any(x[key]["imports_torch"] for x in runs)
        return out

    def report(self, cpu: dict, gpus: list, precision: str, complete: bool = True) -> dict:
        summary = {s: self.rows(s) for s in ("train", "generate", "preprocess") if s in self.plan.only}
        summary["startup"] = self.startup() if "startup" in self.plan.only else None
        return {
            "command": sys.argv,
            "complete": complete,  # False in the file a run rewrites after each measurement
            "machine": {"cpu": cpu, "gpus": gpus, "versions": versions(), "threads": self.plan.threads},
            "plan": dataclasses.asdict(self.plan),
            "peak_flops": {precision: self.peak(precision)},
            "load": {"end": load()},
            "summary": summary,
            "errors": [
                {k: r.get(k) for k in ("kind", "case", "engine", "round", "error")}
                for r in self.records
                if "error" in r
            ],
            "measurements": self.records,
        }


def _gb(n) -> str:
    return f"{n / 2**30:.2f} GB" if n else "-"


def table(report: dict) -> str:
    """The report as Markdown tables (ready for docs/benchmarks.md)."""
    s, plan = report["summary"], report["plan"]
    prec = plan["resolved"].get("precision")
    lines = [
        f"CPU: {report['machine']['cpu']['model']}; GPUs: {', '.join(g['name'] for g in report['machine']['gpus']) or 'none'}; "
        f"{plan['threads']} threads; {plan['rounds']} round(s); precision {prec}; "
        f"matmul peak {report['peak_flops'].get(prec, 0) / 1e9:.1f} GFLOP/s",
        "",
    ]
    head = "| section | case | point | engine | tokens/s best | median | ratio | MFU | peak mem | first step s | load before→after |"
    sep = "|" + "---|" * (head.count("|") - 1)
    body = []
    for section in ("train", "generate", "preprocess"):
        for r in s.get(section) or []:
            point = {"train": f"seq {plan['seq']} x {plan['micro']}", "generate": f"batch {r['point']}"}.get(
                section, ""
            )
            loads = ", ".join(f"{a:.1f}→{b:.1f}" for a, b in r["load"])
            body.append(
                f"| {section} | {r['case']} | {point} | {r['engine']} | {r['tokens_per_s_best']:,.0f} | "
                f"{r['tokens_per_s_median']:,.0f} | {_fmt(r.get('ratio'), '{:.2f}x')} | "
                f"{_fmt(r.get('mfu'), '{:.1%}')} | {_gb(r['peak_mem_bytes'])} | {_fmt(r['first_step_s'], '{:.1f}')} | {loads} |"
            )
    if body:
        lines += [head, sep, *body, ""]
    st = s.get("startup")
    if st:
        lines += [
            "| start-up | best s | imports torch |",
            "|---|---|---|",
            f"| neox --help | {st['help']['seconds_best']:.2f} | {_yes(st['help']['imports_torch'])} |",
            f"| neox config show | {st['config_show']['seconds_best']:.2f} | {_yes(st['config_show']['imports_torch'])} |",
            f"| neox train tiny: first step | {st['train_first_step']['seconds_best']:.2f} | - |",
            "",
        ]
    for e in report["errors"]:
        lines.append(f"failed: {e['kind']} {e.get('case') or ''} {e.get('engine') or ''}: {e['error']}")
    return "\n".join(lines)


def _fmt(x, f: str) -> str:
    return "-" if x is None else f.format(x)


def _yes(b: bool) -> str:
    return "yes" if b else "no"
