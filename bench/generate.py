"""Generation throughput: neox's KV-cache loop against transformers' `generate`, same weights, same run.

    .venv/bin/python bench/generate.py [--shapes pythia-14m,pythia-70m] [--dtypes fp32,bf16] [--batches 1,8]
                                       [--prompt-len 32] [--new-tokens 128] [--trials 3] [--threads 1]

For each shape (random weights; Pythia's layout: parallel residual, rotary_pct 0.25, untied head, vocab 50304)
the neox model is exported to an in-memory GPTNeoXForCausalLM. Both generate greedily with no EOS, so every
row produces exactly --new-tokens tokens, from the same random 32-token prompts. tokens/s = batch * new tokens
/ wall time (prefill included). Each point is the best of --trials runs after one warm-up, the tools
alternating, because the machine may be shared. neox runs twice: eager, and with `compile=True` (the decode
step compiled by torch.compile, `neox generate --compile`); the compiled step's first call (the compilation,
reported as "compile s") is the warm-up and is not timed. Target: neox >= 1.5x transformers at every point.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the models and timing loops `neox bench` (`make bench`) uses; this script adds compiled decoding and dtypes
from neox.bench.generate import build_pair, time_hf, time_neox  # noqa: E402  (after the sys.path line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="pythia-14m,pythia-70m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=3)
    # one thread: with two, every op can stall ~8 ms whenever another process is busy (shared 2-core machine)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    header = (
        f"{'shape':<11} {'dtype':<5} {'batch':>5} {'hf tok/s':>9} {'neox eager':>10} {'ratio':>6} "
        f"{'neox compiled':>13} {'ratio':>6} {'compile s':>9}  same tokens (eager, compiled vs hf)"
    )
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(1)
    for shape in args.shapes.split(","):
        for dname in args.dtypes.split(","):
            ours, hf = build_pair(shape, dtypes[dname])
            for batch in (int(b) for b in args.batches.split(",")):
                prompts = torch.randint(0, 50000, (batch, args.prompt_len), generator=gen).tolist()
                time_neox(ours, prompts, 4), time_hf(hf, prompts, 4)  # warm-up
                compile_s, _ = time_neox(ours, prompts, args.new_tokens, compile=True)  # compiles this shape
                best = {"eager": float("inf"), "compiled": float("inf"), "hf": float("inf")}
                for _ in range(args.trials):
                    t, toks_e = time_neox(ours, prompts, args.new_tokens)
                    best["eager"] = min(best["eager"], t)
                    t, toks_c = time_neox(ours, prompts, args.new_tokens, compile=True)
                    best["compiled"] = min(best["compiled"], t)
                    t, toks_h = time_hf(hf, prompts, args.new_tokens)
                    best["hf"] = min(best["hf"], t)
                n = batch * args.new_tokens
                # bf16 rounding may flip a near-tie between implementations (fused kernels round differently)
                same = [sum(a == b for a, b in zip(toks, toks_h)) for toks in (toks_e, toks_c)]
                print(
                    f"{shape:<11} {dname:<5} {batch:>5} {n / best['hf']:>9.1f} {n / best['eager']:>10.1f} "
                    f"{best['hf'] / best['eager']:>5.2f}x {n / best['compiled']:>13.1f} "
                    f"{best['hf'] / best['compiled']:>5.2f}x {compile_s:>9.1f}  {same[0]}/{batch}, {same[1]}/{batch}",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
