"""GPT2Dataset index build time: doc_idx, sample_idx and shuffle_idx for a synthetic corpus.

    .venv/bin/python bench/index.py                          # 50,000 documents (~100M tokens), seq 2048 and 128
    .venv/bin/python bench/index.py --docs 500000 --seq 2048 --trials 5

Document lengths are uniform in [1, --max-doc-tokens); as many samples are asked for as one epoch yields.
Each build is what `GPT2Dataset` does on a cache miss without the file writes (neox.data.sampling's
num_epochs_needed, build_doc_idx, build_sample_idx, build_shuffle_idx); the best of --trials counts.
Correctness is tested in tests/data/test_sampling.py.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from neox.data.sampling import build_doc_idx, build_sample_idx, build_shuffle_idx, num_epochs_needed, num_tokens


def build_once(sizes: np.ndarray, seq: int, seed: int) -> tuple[int, float]:
    """(samples, seconds) of one index build over every document."""
    docs = np.arange(len(sizes), dtype=np.int32)
    t0 = time.perf_counter()
    tokens = num_tokens(docs, sizes)
    epochs = num_epochs_needed(tokens, seq, tokens // seq - 1)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(docs, epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq, epochs, tokens)
    build_shuffle_idx(len(sample_idx) - 1, rng)
    return len(sample_idx) - 1, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=50_000, help="number of documents (default 50000)")
    ap.add_argument("--max-doc-tokens", type=int, default=4000, help="document lengths are below this (4000)")
    ap.add_argument("--seq", default="2048,128", help="comma-separated sequence lengths (default 2048,128)")
    ap.add_argument("--trials", type=int, default=3, help="builds per sequence length; the fastest counts (3)")
    ap.add_argument("--seed", type=int, default=1234, help="shuffle seed (1234)")
    args = ap.parse_args(argv)

    sizes = np.random.RandomState(0).randint(1, args.max_doc_tokens, size=args.docs).astype(np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    for seq in (int(s) for s in args.seq.split(",")):
        runs = [build_once(sizes, seq, args.seed) for _ in range(args.trials)]
        samples, best = runs[0][0], min(t for _, t in runs)
        print(f"index build: {tokens / 1e6:.0f}M tokens, {args.docs} docs, seq {seq}: {samples} samples in {best:.3f}s")


if __name__ == "__main__":
    main()
