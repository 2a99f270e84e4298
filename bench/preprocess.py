"""End-to-end `neox preprocess` throughput against the raw `tokenizers` encode_batch rate.

    .venv/bin/python bench/preprocess.py [--tokenizer 20b|gpt2] [--workers 2] [--repeat 4] [--trials 3]

Corpus: WikiText-2 test+valid articles (JSONL, 120 documents) and tinyshakespeare (.txt, one document, cut
into pieces for the workers), each listed ``--repeat`` times so start-up costs do not dominate. The raw rates
are the `tokenizers` library alone on the same texts already in memory (cut the same way), with its thread pool
limited to ``--workers`` threads (RAYON_NUM_THREADS): ``encode_batch`` in one call over everything, and
``encode_batch`` / ``encode_batch_fast`` over the pipeline's batches; the fastest of them is the baseline. The
end-to-end rate includes reading, JSON parsing, worker processes, and writing the .bin/.idx. Each side runs
in a fresh process ``--trials`` times, alternating, and the best trial counts (the machine may be shared).
Target: ratio >= 0.8 with --workers 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the two trials `neox bench` (`make bench`) runs; this script runs them on the shared corpora and tokenizers
from neox.bench.preprocess import e2e_trial, raw_trial  # noqa: E402  (after the sys.path line)

SHARED = Path(os.environ.get("NEOX_SHARED", ROOT.parent / "shared")) / "data"
TOKENIZERS = {"20b": "tokenizers/20B_tokenizer.json", "gpt2": "tokenizers/gpt2.json"}


def corpus_files(repeat: int) -> list[str]:
    files = [
        SHARED / "corpora/wikitext-2/test_articles.jsonl",
        SHARED / "corpora/wikitext-2/valid_articles.jsonl",
        SHARED / "corpora/tinyshakespeare.txt",
    ]
    for f in files:
        if not f.is_file():
            sys.exit(f"bench/preprocess.py: {f} not found (set NEOX_SHARED to the shared folder)")
    return [str(f) for f in files] * repeat


def _child(kind: str, args) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.workers), TOKENIZERS_PARALLELISM="true", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        __file__,
        "--_child",
        kind,
        "--tokenizer",
        args.tokenizer,
        "--workers",
        str(args.workers),
        "--repeat",
        str(args.repeat),
        "--batch-bytes",
        str(args.batch_bytes),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"bench/preprocess.py: {kind} trial failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", choices=sorted(TOKENIZERS), default="20b")
    ap.add_argument("--workers", type=int, default=2, help="preprocess workers = raw tokenizer threads")
    ap.add_argument("--repeat", type=int, default=4, help="list each corpus file this many times")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--batch-bytes", type=int, default=1 << 18)
    ap.add_argument("--_child", choices=["raw", "e2e"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    vocab = str(SHARED / TOKENIZERS[args.tokenizer])
    files = corpus_files(args.repeat)
    if args._child == "raw":
        print(json.dumps(raw_trial(vocab, files, args.batch_bytes)))
        return
    if args._child == "e2e":
        print(json.dumps(e2e_trial(vocab, files, args.workers, args.batch_bytes)))
        return

    best: dict = {}
    for _ in range(args.trials):
        trial = {**_child("raw", args), "neox preprocess end-to-end": _child("e2e", args)}
        for name, r in trial.items():
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    e2e = best["neox preprocess end-to-end"]
    raws = [r for name, r in best.items() if name.startswith("raw")]
    if any(r["tokens"] != e2e["tokens"] for r in raws):
        sys.exit(f"bench/preprocess.py: token counts differ: {[r['tokens'] for r in raws]} vs {e2e['tokens']}")
    # The baseline is the best raw variant, wall clock and CPU each on their own.
    base_s = min(r["seconds"] for r in raws)
    base_cpu = min(r["cpu"] for r in raws)
    docs = e2e["docs"]
    print(
        f"corpus: WikiText-2 test+valid articles + tinyshakespeare, x{args.repeat}: {docs} documents, "
        f"{e2e['bytes'] / 1e6:.1f} MB, {e2e['tokens']:,} tokens ({args.tokenizer} tokenizer); "
        f"{args.workers} workers / threads; best of {args.trials}; cpu_count {os.cpu_count()}"
    )
    print(
        f"{'':32} {'seconds':>8} {'docs/s':>9} {'tokens/s':>11} {'MB/s':>7} {'ratio':>6} {'cpu s':>7} {'cpu ratio':>9}"
    )
    for name, r in best.items():
        s = r["seconds"]
        print(
            f"{name:32} {s:8.2f} {docs / s:9.1f} {r['tokens'] / s:11,.0f} {r['bytes'] / s / 1e6:7.2f} "
            f"{base_s / s:6.2f} {r['cpu']:7.2f} {base_cpu / r['cpu']:9.2f}"
        )
    print(
        "ratio = fastest raw seconds / these seconds (wall clock); cpu ratio = the same with CPU seconds "
        "(all threads and worker processes), which a busy shared machine distorts less"
    )


if __name__ == "__main__":
    main()
