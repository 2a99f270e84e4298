"""`neox data inspect PREFIX` (counts, dtype, length histogram, decoded documents/samples),
`neox data merge` (concatenate datasets, as GPT-NeoX's tools/datasets/merge_datasets.py) and
`neox data verify PREFIX` (the index's structure and, with a checksum sidecar, every byte)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from neox.commands.preprocess import add_tokenizer_args
from neox.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    checksum_file_path,
    dataset_exists,
    strip_suffix,
    verify,
)
from neox.data.sampling import GPT2Dataset
from neox.data.tokenizers import build_tokenizer
from neox.errors import DataError, NeoxError


def register(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = sub.add_parser("inspect", help="document/token counts, dtype, length histogram, decoded documents")
    i.add_argument("prefix", help="dataset prefix (PREFIX.bin + PREFIX.idx; a .bin/.idx path also works)")
    i.add_argument(
        "--doc",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="print document N (repeatable; negative counts from the end)",
    )
    i.add_argument(
        "--sample",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="print sample N of GPT-NeoX's packed, shuffled order over all documents (no split)",
    )
    i.add_argument("--seq-length", type=int, default=2048, help="sample length for --sample (default 2048)")
    i.add_argument("--seed", type=int, default=1234, help="shuffle seed for --sample (default 1234)")
    i.add_argument("--max-chars", type=int, default=2000, help="truncate decoded text to this (0 = no limit)")
    add_tokenizer_args(i, default=None)
    i.set_defaults(func=run_inspect)

    m = sub.add_parser("merge", help="concatenate datasets into one (documents kept in order)")
    m.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="a directory (every PREFIX.bin/.idx pair in it, sorted by name, as GPT-NeoX) or prefixes",
    )
    m.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    m.set_defaults(func=run_merge)

    v = sub.add_parser(
        "verify",
        help="check a dataset: the .idx structure against the .bin, and sizes and sha256 against PREFIX.checksums.json",
    )
    v.add_argument("prefix", nargs="+", help="dataset prefixes (PREFIX.bin + PREFIX.idx; a .bin/.idx path also works)")
    v.set_defaults(func=run_verify)


# ---- inspect -------------------------------------------------------------------------------------------------


def length_histogram(sizes: np.ndarray, width: int = 40) -> list[str]:
    """Lines of a log2-bucketed histogram of document lengths."""
    if sizes.size == 0:
        return ["  (no documents)"]
    buckets = np.zeros(64, dtype=np.int64)
    # bucket b holds lengths in [2^(b-1), 2^b); bucket 0 holds empty documents
    idx = np.zeros(sizes.size, dtype=np.int64)
    nz = sizes > 0
    idx[nz] = np.floor(np.log2(sizes[nz])).astype(np.int64) + 1
    np.add.at(buckets, idx, 1)
    used = np.flatnonzero(buckets)
    peak = buckets.max()
    lines = []
    for b in range(used.min(), used.max() + 1):
        lo, hi = (0, 1) if b == 0 else (1 << (b - 1), 1 << b)
        label = "0" if b == 0 else f"[{lo}, {hi})"
        bar = "#" * max(round(width * buckets[b] / peak), 1 if buckets[b] else 0)
        lines.append(f"  {label:>18} {buckets[b]:>10,} {bar}")
    return lines


def _show(tokens: np.ndarray, tokenizer, max_chars: int) -> str:
    if tokenizer is None:
        ids = tokens.tolist()
        return " ".join(map(str, ids[: max_chars or None])) + (" ..." if max_chars and len(ids) > max_chars else "")
    ids = [int(t) for t in tokens if t >= 0]  # labels carry -100 where there is no loss
    text = tokenizer.decode(ids)
    if max_chars and len(text) > max_chars:
        text = text[:max_chars] + f"... [{len(text) - max_chars} more chars]"
    return text


def _document_index(ds: IndexedDataset, doc: int) -> int:
    n = ds.num_documents
    d = doc + n if doc < 0 else doc
    if not 0 <= d < n:
        valid = f"give 0 to {n - 1}, or -1 for the last" if n else "it is empty"
        raise NeoxError(f"--doc {doc}: {ds.prefix} has {n} documents ({valid})")
    return d


def _document_tokens(ds: IndexedDataset, doc: int) -> np.ndarray:
    d = _document_index(ds, doc)
    first, last = int(ds.doc_idx[d]), int(ds.doc_idx[d + 1])
    parts = [ds[i] for i in range(first, last)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=ds.dtype)


def _samples(ds: IndexedDataset, wanted: list, seq_length: int, seed: int):
    with tempfile.TemporaryDirectory(prefix="neox-inspect-") as cache:
        gpt = GPT2Dataset(
            "inspect", ds.prefix, np.arange(len(ds)), ds, max(wanted) + 1, seq_length, seed, cache_dir=cache
        )
        return [(n, gpt[n]["text"], gpt.document_ids(n)) for n in wanted]


def _check_wanted(ds: IndexedDataset, args) -> None:
    # before anything is printed: a bad --doc or --sample is one error line, not statistics and then an error
    for d in args.doc:
        _document_index(ds, d)
    if args.sample:
        if min(args.sample) < 0:
            raise NeoxError("--sample: sample numbers start at 0")
        if args.seq_length < 1:
            raise NeoxError(f"--seq-length {args.seq_length}: must be 1 or more")


def run_inspect(args) -> int:
    ds = IndexedDataset(strip_suffix(args.prefix))
    _check_wanted(ds, args)
    tokenizer = None
    if args.tokenizer_type:
        tokenizer = build_tokenizer(args)
    sizes = ds.sizes.astype(np.int64)
    print(f"dataset   {ds.prefix}")
    print(f"dtype     {ds.dtype.name} ({ds.dtype.itemsize} bytes/token)")
    print(f"documents {ds.num_documents:,}   items {len(ds):,}   tokens {ds.num_tokens:,}")
    if sizes.size:
        print(
            f"item length: min {sizes.min():,}  median {int(np.median(sizes)):,}  "
            f"mean {sizes.mean():,.1f}  max {sizes.max():,}"
        )
        if tokenizer is not None and sizes.sum():
            nz = sizes > 0
            last = ds.pointers[nz] // ds.dtype.itemsize + sizes[nz] - 1
            eod = int(np.count_nonzero(ds.all_tokens()[last] == tokenizer.eod_id))
            print(f"documents ending in EOD ({tokenizer.eod_id}): {eod:,} of {len(ds):,}")
    print("length histogram (tokens per item):")
    print("\n".join(length_histogram(sizes)))
    for d in args.doc:
        tokens = _document_tokens(ds, d)
        print(f"\n--- document {d} ({tokens.size:,} tokens) ---")
        print(_show(tokens, tokenizer, args.max_chars))
    if args.sample:
        for n, tokens, docs in _samples(ds, args.sample, args.seq_length, args.seed):
            print(
                f"\n--- sample {n} (seq_length {args.seq_length}, seed {args.seed}, documents "
                f"{', '.join(map(str, docs.tolist()))}) ---"
            )
            print(_show(tokens, tokenizer, args.max_chars))
    return 0


# ---- merge ---------------------------------------------------------------------------------------------------


def merge_inputs(inputs: list) -> list[str]:
    """Directories expand to their PREFIX.bin/.idx pairs (sorted by name); other entries are prefixes."""
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted({os.path.splitext(f)[0] for f in os.listdir(item) if f.endswith((".bin", ".idx"))})
            for name in names:
                p = os.path.join(item, name)
                if not dataset_exists(p):
                    missing = ".idx" if os.path.isfile(p + ".bin") else ".bin"
                    raise DataError(f"{p}{missing}: missing; every dataset in {item} needs both .bin and .idx")
                prefixes.append(p)
            if not names:
                raise DataError(f"--input: {item}: no .bin/.idx datasets in this directory")
        else:
            prefixes.append(strip_suffix(item))
    return prefixes


def merge_datasets(prefixes: list, output_prefix: str) -> IndexedDataset:
    if not prefixes:
        raise DataError("--input: nothing to merge")
    out = strip_suffix(output_prefix)
    if any(os.path.abspath(p) == os.path.abspath(out) for p in prefixes):
        raise NeoxError(f"--output-prefix {out} is also an input; choose another output")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetBuilder(out, first.dtype) as builder:
        for p in prefixes:
            builder.merge_file_(p)
        builder.finalize()
    return IndexedDataset(out)


def run_merge(args) -> int:
    prefixes = merge_inputs(args.input)
    merged = merge_datasets(prefixes, args.output_prefix)
    print(
        f"neox data merge: {len(prefixes)} datasets -> {merged.prefix}.{{bin,idx}}: "
        f"{merged.num_documents:,} documents, {merged.num_tokens:,} tokens ({merged.dtype.name})",
        file=sys.stdout,
    )
    return 0


# ---- verify --------------------------------------------------------------------------------------------------


def run_verify(args) -> int:
    for prefix in args.prefix:
        ds, checked = verify(strip_suffix(prefix))
        what = (
            f"structure and sha256 match {checksum_file_path(ds.prefix)}"
            if checked
            else f"structure ok; no {checksum_file_path(ds.prefix)} sidecar (written by another tool?), contents "
            f"unchecked: re-run neox preprocess to get one"
        )
        print(f"neox data verify: {ds.prefix}: {ds.num_documents:,} documents, {ds.num_tokens:,} tokens; {what}")
    return 0
