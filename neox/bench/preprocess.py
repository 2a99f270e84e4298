"""One preprocessing measurement: `neox preprocess` end to end, or the raw `tokenizers` library on the same
texts already in memory, cut and batched the way the pipeline cuts them.

The raw side is the baseline the pipeline cannot beat: `encode_batch` in one call over everything, and
`encode_batch` / `encode_batch_fast` over the pipeline's batches; the fastest of them counts. Its thread pool
is RAYON_NUM_THREADS, which the parent sets to the pipeline's worker count. The end-to-end side includes
reading, JSON parsing, worker processes and writing the .bin/.idx. EOD tokens, which only the pipeline adds,
are left out of its count so that both sides count the same tokens.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from neox.data.bpe_training import train_tokenizer
from neox.data.corpora import stdlib_files
from neox.data.preprocess import PreprocessOptions, preprocess
from neox.data.readers import iter_pieces


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its finished children (the pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def stdlib_corpus(out_dir: str, max_bytes: int) -> str:
    """A JSONL corpus of this Python's standard library sources (no download), about `max_bytes` of text."""
    path, size = Path(out_dir) / "stdlib.jsonl", 0
    with open(path, "w", encoding="utf-8") as f:
        for rel, full in stdlib_files():
            try:
                text = Path(full).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
            size += len(text)
            if size >= max_bytes:
                break
    return str(path)


def prepare(out_dir: str, max_bytes: int, tokenizer: str | None) -> dict:
    """The corpus and the tokenizer file both sides use: `tokenizer`, or a 4096-token BPE trained on it."""
    corpus = stdlib_corpus(out_dir, max_bytes)
    if tokenizer is None:
        tokenizer = os.path.join(out_dir, "tokenizer.json")
        train_tokenizer([corpus], 4096, tokenizer)
    return {"corpus": corpus, "tokenizer": tokenizer}


def raw_trial(vocab: str, files: list[str], batch_bytes: int) -> dict:
    from tokenizers import Tokenizer

    texts, nbytes = [], 0
    for p in iter_pieces(files, "file", segment_chars=max(batch_bytes // 4, 1), splittable=True):
        if p.is_json:
            nbytes += len(p.data)
            texts.append(json.loads(p.data)["text"])
        else:
            nbytes += len(p.data.encode("utf-8"))
            texts.append(p.data)
    tok = Tokenizer.from_file(vocab)
    batches, cur, size = [], [], 0
    for t in texts:  # the pipeline's batching: about batch_bytes of input per call
        cur.append(t)
        size += len(t)
        if size >= batch_bytes:
            batches.append(cur)
            cur, size = [], 0
    batches += [cur] if cur else []
    out = {}
    for method, groups in (
        ("encode_batch, one call", [texts]),
        ("encode_batch, batches", batches),
        ("encode_batch_fast, batches", batches),
    ):
        fn = getattr(tok, method.split(",")[0])
        c0, t0 = cpu_seconds(), time.perf_counter()
        tokens = 0
        for group in groups:
            tokens += sum(len(e.ids) for e in fn(group, add_special_tokens=False))
        out["raw " + method] = {
            "seconds": time.perf_counter() - t0,
            "cpu": cpu_seconds() - c0,
            "tokens": tokens,
            "bytes": nbytes,
        }
    return out


def e2e_trial(vocab: str, files: list[str], workers: int, batch_bytes: int) -> dict:
    c0 = cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="neox-bench-") as out:
        opts = PreprocessOptions(
            inputs=files,
            output_prefix=os.path.join(out, "bench"),
            workers=workers,
            batch_bytes=batch_bytes,
            append_eod=True,
            progress=False,
        )
        s = preprocess(opts, SimpleNamespace(tokenizer_type="HFTokenizer", vocab_file=vocab, merge_file=None))
    return {
        "seconds": s.seconds,
        "cpu": cpu_seconds() - c0,
        "tokens": s.tokens - s.documents,
        "bytes": s.bytes,
        "docs": s.documents,
    }


def preprocess_case(engine: str, corpus: str, tokenizer: str, workers: int, batch_bytes: int = 1 << 18) -> dict:
    """tokens/s of one side; the raw side reports its fastest variant and lists them all."""
    if engine == "neox":
        r = e2e_trial(tokenizer, [corpus], workers, batch_bytes)
        return {**r, "tokens_per_s": r["tokens"] / r["seconds"]}
    if engine == "raw":
        variants = raw_trial(tokenizer, [corpus], batch_bytes)
        name, best = min(variants.items(), key=lambda kv: kv[1]["seconds"])
        return {**best, "tokens_per_s": best["tokens"] / best["seconds"], "variant": name, "variants": variants}
    raise ValueError(f"preprocess: unknown engine {engine!r}")
