"""Tokenize JSONL / text corpora into GPT-NeoX ``{prefix}_{key}_document.{bin,idx}`` datasets.

The reading process streams the input in batches of about ``batch_bytes`` to a pool of worker processes;
each worker parses, cleans and tokenizes a whole batch with one ``encode_batch`` call and sends back the
tokens already packed as a numpy array in the output dtype; the reading process writes each batch with one
write per dataset. Results are consumed in submission order, with a bounded number in flight, so documents
come out in input order for any ``workers`` and memory stays flat in the corpus size.

Malformed input lines (invalid UTF-8, bad JSON, not an object, missing key, non-string value) are skipped
and reported as ``file:line: reason``; ``strict`` makes the first one fatal.

Fine-tuning labels (GPT-NeoX ``preprocess_data_with_mask``): with ``mask_before_token`` (a token-id
sequence) a ``{prefix}_label_document`` dataset is written whose items equal the text items except that every
token up to and including the first occurrence of the sequence is -100 (a document without the sequence is
not masked, as in GPT-NeoX). With ``prompt_key`` each JSON line's prompt is tokenized separately and put in
front of the text, and the label is -100 over the prompt tokens. Labels are int32 (they need the sign).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from neox.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from neox.data.readers import BadLine, Piece, expand_inputs, iter_pieces, json_line_error
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError, DataError, NeoxError

IGNORE_INDEX = -100
LABEL_KEY = "label"
MAX_REPORTED = 20


@dataclass
class PreprocessOptions:
    inputs: list
    output_prefix: str
    json_keys: list = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    ftfy: bool = False
    workers: int = 1
    strict: bool = False
    text_mode: str = "file"
    mask_before_token: list | None = None
    prompt_key: str | None = None
    dtype: str | None = None
    batch_bytes: int = 1 << 18
    log_interval: int = 100
    num_docs: int | None = None
    progress: bool | None = None  # None: a progress bar only on an interactive stderr


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: int = 0
    empty: int = 0
    outputs: dict = field(default_factory=dict)  # key -> prefix
    dtype: str = ""

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        out = ", ".join(f"{p}.{{bin,idx}}" for p in self.outputs.values())
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:.2f} MB in {s:.2f} s "
            f"({self.documents / s:,.1f} docs/s, {self.tokens / s:,.0f} tokens/s, "
            f"{self.bytes / s / 1e6:.2f} MB/s); skipped {self.skipped} malformed, {self.empty} empty; "
            f"wrote {out} ({self.dtype})"
        )


# ---- worker side ---------------------------------------------------------------------------------------------

_W: dict = {}


def _init_worker(tok, opts: PreprocessOptions, dtype: str, single_thread: bool) -> None:
    # The tokenizer object itself is passed: under fork it is inherited for free instead of re-loaded.
    if single_thread:
        tok.limit_threads(1)
    fix = None
    if opts.ftfy:
        import ftfy

        fix = ftfy.fix_text
    _W.update(tok=tok, opts=opts, dtype=np.dtype(dtype), fix=fix)


def _texts_of(piece: Piece, keys: list, prompt_key: str | None):
    """The texts of a piece for each key (prompt first when asked), or a BadLine saying why not."""
    if not piece.is_json:
        return [piece.data]
    try:
        line = piece.data.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadLine(piece.path, piece.line, f"invalid UTF-8 at byte {e.start}")
    try:
        obj = json.loads(line)
    except ValueError as e:
        return BadLine(piece.path, piece.line, json_line_error(e))
    except RecursionError:
        return BadLine(piece.path, piece.line, "bad JSON: nested too deeply to parse")
    if not isinstance(obj, dict):
        return BadLine(piece.path, piece.line, f"expected a JSON object, got {type(obj).__name__}")
    texts = []
    for key in ([prompt_key] if prompt_key else []) + keys:
        if key not in obj:
            have = ", ".join(list(map(str, obj))[:5]) + (", ..." if len(obj) > 5 else "")
            return BadLine(piece.path, piece.line, f"missing key {key!r} (has: {have or 'no keys'})")
        value = obj[key]
        if not isinstance(value, str):
            return BadLine(piece.path, piece.line, f"key {key!r} is {type(value).__name__}, not a string")
        texts.append(value)
    return texts


def encode_pieces(pieces: list) -> dict:
    """Tokenize one batch (runs in a worker). Returns arrays per key plus per-piece bookkeeping."""
    tok, opts, dtype, fix = _W["tok"], _W["opts"], _W["dtype"], _W["fix"]
    keys = opts.json_keys
    n_fields = len(keys) + (1 if opts.prompt_key else 0)
    kept, bad, texts, nbytes, empty = [], [], [], 0, 0
    for p in pieces:
        nbytes += len(p.data) if p.is_json else len(p.data.encode("utf-8"))
        got = _texts_of(p, keys, opts.prompt_key)
        if isinstance(got, BadLine):
            bad.append(got)
            continue
        if p.is_json and not any(got[-len(keys) :]):
            empty += 1
            continue
        if fix is not None:
            got = [fix(t) for t in got]
        kept.append(p)
        texts.extend(got if p.is_json else got * n_fields)
    ids = tok.encode_batch(texts) if texts else []
    eod = [tok.eod_id]
    per_key: dict = {}
    prompt_lens = []
    for k_i, key in enumerate(keys):
        seqs = []
        for d_i, p in enumerate(kept):
            base = d_i * n_fields
            seq = ids[base + n_fields - len(keys) + k_i]
            if opts.prompt_key:
                prompt = ids[base] if p.is_json else []
                if k_i == 0:
                    prompt_lens.append(len(prompt))
                seq = prompt + seq
            if opts.append_eod and p.last:
                seq = seq + eod
            seqs.append(seq)
        sizes = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(sizes.sum()))
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):
            raise DataError(f"{kept[0].path}: token id {int(flat.max())} does not fit {dtype.name}")
        per_key[key] = (flat.astype(dtype), sizes)
    return {
        "keys": per_key,
        "last": [p.last for p in kept],
        "bad": bad,
        "bytes": nbytes,
        "empty": empty,
        "prompt_lens": prompt_lens,
    }


# ---- reading / writing side ----------------------------------------------------------------------------------


def _batches(pieces: Iterable[Piece], batch_bytes: int) -> Iterator[list]:
    batch, size = [], 0
    for p in pieces:
        batch.append(p)
        size += len(p.data)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _ordered_map(fn, items: Iterable, workers: int, initargs: tuple) -> Iterator:
    """fn over items in order; with workers > 1 on a process pool with at most 2*workers batches in flight."""
    if workers <= 1:
        _init_worker(*initargs)
        try:
            for it in items:
                yield fn(it)
        finally:
            _W.clear()  # do not keep the tokenizer alive in a long-lived process
        return
    # fork is cheap and safe here: the parent has not started the tokenizers library's thread pool.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # Workers start with the tokenizers library's threads off (N processes already use N cores): set in the
    # environment they are forked with (at the first submit), so the library does not warn about the fork.
    # A process pool from concurrent.futures, not multiprocessing.Pool: a worker that dies (killed for memory)
    # fails the run instead of hanging it.
    with (
        _env("TOKENIZERS_PARALLELISM", "false"),
        ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs) as pool,
    ):
        pending: deque = deque()
        try:
            for it in items:
                pending.append(pool.submit(fn, it))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise NeoxError(
                "a preprocessing worker process died (out of memory? try fewer --workers or a smaller --batch-bytes)"
            ) from None
        finally:
            for f in pending:
                f.cancel()


def _find(seq: np.ndarray, pattern: np.ndarray) -> int:
    """Index of the first occurrence of pattern in seq, or -1."""
    m = len(pattern)
    if m == 0 or len(seq) < m:
        return -1
    for start in np.flatnonzero(seq[: len(seq) - m + 1] == pattern[0]):
        if np.array_equal(seq[start : start + m], pattern):
            return int(start)
    return -1


def mask_label(tokens: np.ndarray, pattern) -> np.ndarray:
    """GPT-NeoX's label: -100 up to and including the first occurrence of pattern; unchanged without one."""
    label = tokens.astype(np.int32)
    at = _find(label, np.asarray(pattern, dtype=np.int32))
    if at >= 0:
        label[: at + len(pattern)] = IGNORE_INDEX
    return label


class _Writer:
    """The output datasets and the one document that may be open across batches."""

    def __init__(self, prefix: str, keys: list, dtype: np.dtype, labels: bool, opts: PreprocessOptions):
        self.keys, self.opts = keys, opts
        self.paths = {k: f"{prefix}_{k}_document" for k in keys}
        if labels:
            self.paths[LABEL_KEY] = f"{prefix}_{LABEL_KEY}_document"
        self.builders = {
            k: IndexedDatasetBuilder(p, np.int32 if k == LABEL_KEY else dtype) for k, p in self.paths.items()
        }
        self.labels = labels
        self.open = False  # a text document continues into the next piece
        self.open_tokens: list = []  # its tokens so far, only kept when labels need the whole document
        self.documents = 0
        self.tokens = 0

    def add(self, res: dict) -> None:
        lasts = res["last"]
        if not lasts:
            return
        main = self.keys[0]
        if not self.open and all(lasts) and not self.labels:
            for key in self.keys:
                flat, sizes = res["keys"][key]
                self.builders[key].add_documents(flat, sizes)
            self.documents += len(lasts)
            self.tokens += int(res["keys"][main][0].size)
            return
        offsets = {k: np.concatenate([[0], np.cumsum(res["keys"][k][1])]) for k in self.keys}
        for i, last in enumerate(lasts):
            for key in self.keys:
                flat = res["keys"][key][0]
                part = flat[offsets[key][i] : offsets[key][i + 1]]
                self.builders[key].write_tokens(part)
                if key == main and self.labels:
                    self.open_tokens.append(part)
            self.tokens += int(offsets[main][i + 1] - offsets[main][i])
            self.open = not last
            if last:
                for key in self.keys:
                    self.builders[key].close_item()
                    self.builders[key].end_document()
                if self.labels:
                    self._write_label(res["prompt_lens"][i] if res["prompt_lens"] else 0)
                self.documents += 1

    def _write_label(self, prompt_len: int) -> None:
        tokens = np.concatenate(self.open_tokens) if self.open_tokens else np.zeros(0, np.int32)
        self.open_tokens = []
        if self.opts.prompt_key:
            label = tokens.astype(np.int32)
            label[:prompt_len] = IGNORE_INDEX
        else:
            label = mask_label(tokens, self.opts.mask_before_token)
        self.builders[LABEL_KEY].add_document(label)

    def finalize(self) -> None:
        for b in self.builders.values():
            b.finalize()

    def abort(self) -> None:
        for b in self.builders.values():
            b.abort()


def _check(opts: PreprocessOptions) -> None:
    if not opts.json_keys:
        raise ConfigError("--json-keys: give at least one key")
    labels = bool(opts.mask_before_token) or bool(opts.prompt_key)
    if labels and len(opts.json_keys) != 1:
        raise ConfigError("--json-keys: label datasets (--mask-before-token / --prompt-key) need exactly one key")
    if LABEL_KEY in opts.json_keys and labels:
        raise ConfigError("--json-keys: 'label' is the name of the generated label dataset; rename that key")
    if opts.mask_before_token and opts.prompt_key:
        raise ConfigError("--mask-before-token and --prompt-key are two ways to make labels; use one")
    if opts.workers < 1:
        raise ConfigError(f"--workers: {opts.workers}; use 1 or more")
    if opts.batch_bytes < 1:
        raise ConfigError("--batch-bytes must be positive")


def _report(bad: list, seen: int, strict: bool) -> int:
    for b in bad:
        if strict:
            raise DataError(f"{b} (--strict stops at the first malformed line)")
        if seen < MAX_REPORTED:
            print(f"warning: skipped {b}", file=sys.stderr)
        seen += 1
    return seen


def preprocess(opts: PreprocessOptions, tokenizer_cfg) -> Summary:
    """Run preprocessing; returns the summary. ``tokenizer_cfg`` is a TokenizerConfig-like object."""
    _check(opts)
    files = expand_inputs(opts.inputs)
    tok = build_tokenizer(tokenizer_cfg)
    dtype = np.dtype(opts.dtype) if opts.dtype else best_fitting_dtype(tok.vocab_size)
    if dtype.kind == "u" and np.iinfo(dtype).max < tok.vocab_size - 1:
        raise ConfigError(f"--dtype {dtype.name} cannot hold ids up to {tok.vocab_size - 1}")
    labels = bool(opts.mask_before_token) or bool(opts.prompt_key)

    text_bad: list = []
    pieces = iter_pieces(
        files, opts.text_mode, segment_chars=max(opts.batch_bytes // 4, 1), splittable=tok.splittable, bad=text_bad
    )
    batches = _batches(pieces, opts.batch_bytes)
    initargs = (tok, opts, dtype.str, opts.workers > 1)

    summary = Summary(dtype=dtype.name)
    show = sys.stderr.isatty() if opts.progress is None else opts.progress
    from tqdm import tqdm

    # shutil falls back to 80x24 where a terminal reports 0x0 (tqdm would then draw nothing at all)
    cols, rows = shutil.get_terminal_size()
    bar = tqdm(total=opts.num_docs, unit="doc", disable=not show, file=sys.stderr, ncols=cols, nrows=rows)
    writer = _Writer(opts.output_prefix, list(opts.json_keys), dtype, labels, opts)
    start = time.perf_counter()
    reported = 0
    last_shown = 0
    try:
        for res in _ordered_map(encode_pieces, batches, opts.workers, initargs):
            # Text lines are checked while reading, JSON lines in the workers; both reach here in input order
            # as far as each file type goes.
            reported = _report(text_bad, reported, opts.strict)
            summary.skipped += len(text_bad)
            text_bad.clear()
            reported = _report(res["bad"], reported, opts.strict)
            summary.skipped += len(res["bad"])
            summary.empty += res["empty"]
            summary.bytes += res["bytes"]
            writer.add(res)
            if writer.documents - last_shown >= opts.log_interval:
                el = max(time.perf_counter() - start, 1e-9)
                bar.update(writer.documents - last_shown)
                last_shown = writer.documents
                bar.set_postfix_str(f"{writer.tokens / el:,.0f} tok/s, {summary.bytes / el / 1e6:.2f} MB/s")
        reported = _report(text_bad, reported, opts.strict)
        summary.skipped += len(text_bad)
        if writer.documents == 0:  # an empty dataset only fails later, at training time, far from the cause
            raise DataError(
                f"--input {','.join(map(str, opts.inputs))}: no documents to write "
                f"({summary.skipped} malformed lines, {summary.empty} empty documents skipped); "
                f"check the files and --json-keys ({' '.join(opts.json_keys)})"
            )
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.update(writer.documents - last_shown)
        bar.close()
    if reported > MAX_REPORTED:
        print(f"warning: ... and {reported - MAX_REPORTED} more malformed lines", file=sys.stderr)
    summary.seconds = time.perf_counter() - start
    summary.documents, summary.tokens = writer.documents, writer.tokens
    summary.outputs = dict(writer.paths)
    return summary
