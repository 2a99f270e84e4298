"""Eval sets (``lambada``, ``piqa``, ``wikitext2``): the data the bundled local lm-eval tasks read.

They go to the eval data folder (``NEOX_EVAL_DATA``, else ``~/.cache/neox/eval-data``) under fixed relative
paths. Every download is an upstream copy pinned to one revision, so its bytes (and sha256) cannot change under
the URL; the files built from the downloads (PIQA with its labels, WikiText-2 split into articles) are
checksummed too.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass

from neox.data.download import Source, fetch, sha256_of, write_jsonl
from neox.errors import DataError, ensure_dir

EVAL_DATA_ENV = "NEOX_EVAL_DATA"
# the variable's name before the eval data folder had a default; still read so existing setups keep working
OLD_EVAL_DATA_ENV = "NEOX_SHARED_DATA"


@dataclass(frozen=True)
class EvalSet:
    """Data that bundled local lm-eval tasks read, as files at fixed paths inside the eval data folder."""

    name: str
    description: str
    downloads: tuple  # (Source, path in the eval data folder) per file fetched
    built: tuple = ()  # (path in the eval data folder, sha256) of the file made from the downloads, if any


# Upstream copies pinned to one revision, so the bytes (and checksums) cannot change under the URL.
_GH = "https://raw.githubusercontent.com"
EVAL_SETS = {
    e.name: e
    for e in [
        EvalSet(
            "lambada",
            "LAMBADA test set, OpenAI's preprocessing (5,153 passages; lm-eval's lambada_openai data) "
            "for lambada_openai_local and lambada_gen_local",
            (
                (
                    Source(
                        "https://huggingface.co/datasets/EleutherAI/lambada_openai/resolve/"
                        "900124bf3b8235c6daf21033af9948b3f07346c4/data/lambada_test.jsonl",
                        "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
                    ),
                    "eval/lambada_openai_test.jsonl",
                ),
            ),
        ),
        EvalSet(
            "piqa",
            "PIQA dev set with its labels (1,838 questions) for piqa_local",
            (
                (
                    Source(
                        f"{_GH}/ybisk/ybisk.github.io/21edab439af693b961be2f069e8690a88d3b4e37/piqa/data/valid.jsonl",
                        "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
                    ),
                    "eval/piqa_valid.jsonl",
                ),
                (
                    Source(
                        f"{_GH}/ybisk/ybisk.github.io/21edab439af693b961be2f069e8690a88d3b4e37/piqa/data/"
                        "valid-labels.lst",
                        "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
                    ),
                    "eval/piqa_valid-labels.lst",
                ),
            ),
            ("eval/piqa_valid_labeled.jsonl", "61533005e22f175534909b1ec8eacb6da03c233933558d1bafb15787453b1f55"),
        ),
        EvalSet(
            "wikitext2",
            "WikiText-2 (v1, tokenized) test split as 60 articles for wikitext2_local",
            (
                (
                    Source(
                        f"{_GH}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/"
                        "data/wikitext-2/test.txt",
                        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                    ),
                    "corpora/wikitext-2/test.txt",
                ),
            ),
            (
                "corpora/wikitext-2/test_articles.jsonl",
                "5ea5ffadf444ed73494efd84d1f05c7bbee1272035930fa4c15b218c6ac3f2fd",
            ),
        ),
    ]
}


def eval_data_dir(explicit: str | os.PathLike | None = None) -> str:
    """The eval data folder: ``explicit``, else $NEOX_EVAL_DATA (or the older $NEOX_SHARED_DATA), else
    $XDG_CACHE_HOME/neox/eval-data (~/.cache/neox/eval-data)."""
    chosen = explicit or os.environ.get(EVAL_DATA_ENV) or os.environ.get(OLD_EVAL_DATA_ENV)
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(cache), "neox", "eval-data")


def eval_set_for(path: str) -> str | None:
    """The eval set that provides ``path`` (relative to the eval data folder), or None."""
    for e in EVAL_SETS.values():
        if path in [p for _, p in e.downloads] + ([e.built[0]] if e.built else []):
            return e.name
    return None


def piqa_labeled(questions: str, labels: str):
    """PIQA rows with their label added (``{goal, sol1, sol2, label}``, the fields lm-eval's piqa task reads)."""
    with open(questions, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(labels, encoding="utf-8") as f:
        answers = f.read().split()
    if len(rows) != len(answers):
        raise DataError(f"{labels}: {len(answers)} labels for the {len(rows)} questions in {questions}")
    return ({**row, "label": int(label)} for row, label in zip(rows, answers))


WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(text: str) -> list[str]:
    """Split WikiText at its articles: one starts at the `` `` line before a top-level title line `` = T = ``
    that has a `` `` line on both sides (two equation lines in the test split look like titles but lack them).
    Joined, the pieces give back ``text``."""
    lines = text.splitlines(keepends=True)
    starts = [
        i - 1
        for i in range(1, len(lines) - 1)
        if lines[i - 1] == " \n" and lines[i + 1] == " \n" and WIKITEXT_TITLE.match(lines[i].rstrip("\n"))
    ]
    bounds = sorted({0, *starts}) + [len(lines)]
    return ["".join(lines[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def _wikitext_docs(files: list[str]):
    with open(files[0], encoding="utf-8", newline="") as f:
        return ({"text": t} for t in wikitext_articles(f.read()))


_EVAL_BUILDERS = {"piqa": lambda files: piqa_labeled(*files), "wikitext2": _wikitext_docs}


def prepare_eval_set(
    name: str,
    out_dir: str,
    mirror: str | None = None,
    url: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    sha256: str | None = None,
) -> str:
    """Download eval set ``name`` into the eval data folder ``out_dir`` (and build its derived file); returns
    the path of the file the tasks read (the built one, else the download)."""
    spec = EVAL_SETS[name]
    ensure_dir(out_dir, "eval data folder")
    files = fetch(name, list(spec.downloads), out_dir, mirror, url, force, progress, sha256)
    if not spec.built:
        return files[0]
    rel, built_sha256 = spec.built
    out_path = os.path.join(out_dir, rel)
    if os.path.isfile(out_path) and not force:
        return out_path
    write_jsonl(out_path, _EVAL_BUILDERS[name](files))
    digest = sha256_of(out_path)
    if digest != built_sha256:
        os.remove(out_path)
        raise DataError(
            f"{out_path}: built with sha256 {digest}, expected {built_sha256}; run with -f to download again"
        )
    return out_path
