"""Attention memory and speed: the dense-mask path (what every masked mode ran before) against the paths
neox/model/attention_paths.py now picks on CPU.

    .venv/bin/python bench/attention.py [--cases alibi,rpe,documents,bigbird,window] [--heads 8] [--head-dim 64]
                                        [--trials 2] [--threads 1]

One attention op (q, k, v [1, heads, T, head_dim] fp32, 2 kv heads fewer than query heads: GQA 8/4), as a
layer of the model calls it:
- alibi, rpe, documents at T = 2048: ALiBi bias, a T5 bias table (its gradient included), four packed
  documents of 512 tokens; dense (one [T, T] mask, bias folded in) against chunked (256 query rows at a time,
  each chunk's mask and bias built for it and rebuilt in the backward pass).
- bigbird at T = 2048 (block 64, 3 window blocks, 1 global, 2 random): dense against block_sparse.
- window at T = 8192: Mistral's sliding_window_width 4096 on the chunked path against global causal
  attention (SDPA's causal kernel): the window must be faster.

Memory: each point runs in a fresh process; "peak MiB" is the growth of the process's peak resident set
(getrusage ru_maxrss) over one call, measured after the same call at T = 256 (library set-up) and after q, k,
v (and the output gradient) exist, so it counts what the attention call allocates: masks, scores, saved
tensors, gradients. Time: best of --trials calls after that
first one. "train" = forward + backward, "infer" = forward under no_grad. The machine may be shared; the
numbers in docs/benchmarks.md say when it was (and why they use one thread).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    # case: (T, [(label, path), ...]) with the first path the baseline
    "alibi": (2048, [("dense", "dense"), ("chunked", "chunked")]),
    "rpe": (2048, [("dense", "dense"), ("chunked", "chunked")]),
    "documents": (2048, [("dense", "dense"), ("chunked", "chunked")]),
    "bigbird": (2048, [("dense", "dense"), ("block_sparse", "block_sparse")]),
    "window": (8192, [("global causal", "causal"), ("window 4096", "chunked")]),
}
KV_HEADS_DIVISOR = 2


def setup(case: str, t: int, heads: int, head_dim: int):
    """(q, k, v, ForwardMask, LayerMask, rpe table or None, block pairs or None)."""
    import torch

    from neox.config.attention import SparsityParams
    from neox.model import attention_paths as paths
    from neox.model.masks import ForwardMask, LayerMask
    from neox.model.positional import ALiBi
    from neox.model.sparsity import block_layout

    g = torch.Generator().manual_seed(0)
    kv = heads // KV_HEADS_DIVISOR
    q = torch.randn(1, heads, t, head_dim, generator=g)
    k = torch.randn(1, kv, t, head_dim, generator=g)
    v = torch.randn(1, kv, t, head_dim, generator=g)
    fm = ForwardMask(q_offset=0, num_queries=t, num_keys=t, batch=1)
    lm, table, pairs = LayerMask(), None, None
    pos = torch.arange(t)[None]
    if case == "alibi":
        fm.q_pos = fm.k_pos = pos.float()
        fm.alibi_slopes = ALiBi(heads).slopes
    elif case == "rpe":
        fm.q_pos = fm.k_pos = pos
        fm.rpe = (32, 128)
        # the layer's bias per distance, as Attention hands it to the paths (rpe_by_distance of its table)
        table = torch.randn(heads, 129, generator=g)
    elif case == "documents":
        fm.set_segments((torch.arange(t) // 512)[None])
    elif case == "bigbird":
        p = SparsityParams("bigbird", block=64, num_sliding_window_blocks=3, num_global_blocks=1, num_random_blocks=2)
        lm = LayerMask(layout=block_layout("bigbird", p, heads, t // 64, seed=1), block=64)
        pairs = paths.BlockPairs(lm.layout, 64, t)
    elif case == "window":
        lm = LayerMask(window=4096)
    return q, k, v, fm, lm, table, pairs


def call(path: str, q, k, v, fm, lm, table, pairs):
    import torch.nn.functional as F

    from neox.model import attention_paths as paths

    if path == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if path == "dense":
        return paths.dense(q, k, v, fm, lm, table)
    if path == "chunked":
        return paths.chunked(q, k, v, fm, lm, table)
    return paths.block_sparse(q, k, v, fm, lm, pairs, table)


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_one(case: str, path: str, mode: str, heads: int, head_dim: int, trials: int, threads: int) -> dict:
    """In this process: peak memory growth of the first call, then the best time of `trials` more."""
    import torch

    torch.set_num_threads(threads)
    t = CASES[case][0]
    # the same call at a small size first: library set-up (thread pools, kernel caches) is not the call's memory
    warm = setup(case, 256, heads, head_dim)
    small_leaves = [x.requires_grad_(mode == "train") for x in warm[:3]]
    out = call(path, *warm)
    if mode == "train":
        torch.autograd.grad(out, small_leaves, torch.ones_like(out), allow_unused=True)
    del warm, small_leaves, out
    q, k, v, fm, lm, table, pairs = setup(case, t, heads, head_dim)
    train = mode == "train"
    leaves = [x.requires_grad_(train) for x in (q, k, v)] + ([table.requires_grad_(train)] if table is not None else [])
    grad_out = torch.randn(q.shape)

    def once():
        if train:
            out = call(path, q, k, v, fm, lm, table, pairs)
            torch.autograd.grad(out, leaves, grad_out)
        else:
            with torch.no_grad():
                call(path, q, k, v, fm, lm, table, pairs)

    before = peak_kib()
    start = time.perf_counter()
    once()
    first = time.perf_counter() - start
    grown = peak_kib() - before
    best = first
    for _ in range(trials):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return {"peak_mib": grown / 1024, "seconds": best}


def run_point(args, case: str, path: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--one", case, path, mode, "--heads", str(args.heads)]
    cmd += ["--head-dim", str(args.head_dim), "--trials", str(args.trials), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--trials", type=int, default=2)
    # one thread by default: on a shared machine a second thread makes each of the chunked paths' many small
    # kernels wait for it whenever it is descheduled, and the timing measures that instead of the path
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=3, metavar=("CASE", "PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.heads, args.head_dim, args.trials, args.threads)))
        return
    print(f"heads {args.heads} (kv {args.heads // KV_HEADS_DIVISOR}), head_dim {args.head_dim}, batch 1, fp32")
    print("| case | T | mode | path | peak MiB | s | memory vs first | time vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        t, variants = CASES[case]
        for mode in args.modes.split(","):
            base = None
            for label, path in variants:
                r = run_point(args, case, path, mode)
                base = base or r
                mem = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
                print(
                    f"| {case} | {t} | {mode} | {label} | {r['peak_mib']:.0f} | {r['seconds']:.3f} | "
                    f"{mem:.2f} | {r['seconds'] / base['seconds']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
