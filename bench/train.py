"""Training throughput: neox's trainer step vs. Hugging Face GPTNeoXForCausalLM, same shape, batch and dtype.

    python bench/train.py                       # pythia-14m and pythia-70m shapes, fp32 and bf16, seq 512, micro 4
    python bench/train.py --models 14m --steps 2 --json out.json

Each case runs in its own process, so peak memory (peak RSS on CPU, max allocated on CUDA) is that case's.
Each process builds the model, takes warm-up steps, then times `--steps` optimizer steps and reports the
median: tokens/s, MFU (the model's training FLOPs per token against the matmul peak measured on this machine
in that dtype, neox.train.metrics.measure_peak_flops) and peak memory.

neox runs its real Trainer step (StepRunner forward/backward, gradient clipping, the default fused AdamW)
on a synthetic GPT-NeoX .bin/.idx dataset of random tokens. Hugging Face runs the usual loop: model(input_ids,
labels=...).loss, backward, clip_grad_norm_, torch.optim.AdamW; its bf16 is autocast over fp32 weights (what
`Trainer(bf16=True)` does) and, as a second row, the model cast to bf16 ("pure").

The measuring code is neox.bench.train, the same that `neox bench` (`make bench`) runs; this script adds the
matrix of precisions and bf16 modes. Machine load changes these numbers a lot on a shared CPU: the 1-minute load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (engine, precision label) in the order they run
    ("neox", "fp32"),
    ("hf", "fp32"),
    ("neox", "bf16-autocast"),
    ("neox", "bf16-pure"),
    ("hf", "bf16-autocast"),
    ("hf", "bf16-pure"),
]


def one_case(args) -> dict:
    """Runs inside the child process: one engine, shape and precision."""
    import torch

    from neox.bench.train import pythia_config, run_hf, run_neox  # the measuring code `neox bench` runs
    from neox.model import flops_per_token
    from neox.train.metrics import measure_peak_flops, peak_memory_bytes

    torch.set_num_threads(args.threads)
    cfg = pythia_config(args.case_shape, args.seq, args.micro, args.case_precision)
    if args.case_engine == "neox":
        times = run_neox(cfg, args.steps, args.warmup)
    else:
        times = run_hf(cfg, args.steps, args.warmup, args.case_precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.case_precision == "fp32" else torch.bfloat16
    tokens = args.micro * args.seq
    tps = tokens / statistics.median(times)
    peak = measure_peak_flops(device, dtype, torch.get_num_threads())
    return {
        "engine": args.case_engine,
        "shape": args.case_shape,
        "precision": args.case_precision,
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(cfg.model) / peak,
        "peak_flops": peak,
        "peak_mem_bytes": peak_memory_bytes(device),
        "step_times_s": times,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="14m,70m", help="comma-separated shapes: 14m, 70m, 160m, 410m")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (bf16 runs autocast and pure)")
    p.add_argument("--engines", default="neox,hf")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--case", nargs=3, metavar=("ENGINE", "SHAPE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:
        args.case_engine, args.case_shape, args.case_precision = args.case
        print(json.dumps(one_case(args)))
        return 0

    shapes = args.models.split(",")
    precisions = set(args.precisions.split(","))
    engines = set(args.engines.split(","))
    results = []
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs), threads {args.threads}")
    print(f"{'shape':>5} {'engine':>6} {'precision':>14} {'tokens/s':>9} {'MFU':>6} {'peak mem':>9}  load")
    for shape in shapes:
        for engine, precision in CASES:
            if engine not in engines or precision.split("-")[0] not in precisions:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--case",
                engine,
                shape,
                precision,
                "--seq",
                str(args.seq),
                "--micro",
                str(args.micro),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{shape:>5} {engine:>6} {precision:>14}  failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["load_avg"] = os.getloadavg()[0]
            results.append(r)
            print(
                f"{shape:>5} {engine:>6} {precision:>14} {r['tokens_per_s']:>9.0f} {100 * r['mfu']:>5.1f}% "
                f"{r['peak_mem_bytes'] / 2**30:>7.2f}GB  {r['load_avg']:.1f}",
                flush=True,
            )
    for shape in shapes:
        best = {
            e: max((r["tokens_per_s"] for r in results if r["shape"] == shape and r["engine"] == e), default=0)
            for e in ("neox", "hf")
        }
        if best["hf"] and best["neox"]:  # both engines ran
            print(
                f"{shape}: best neox {best['neox']:.0f} tok/s vs best HF {best['hf']:.0f} tok/s "
                f"= {best['neox'] / best['hf']:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
