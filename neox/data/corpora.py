"""Named corpora: where to download them, their checksums, and how each becomes ``NAME.jsonl``.

The registry follows GPT-NeoX's ``tools/datasets/corpora.py`` (names and URLs). Every download is verified
(neox/data/download.py): the Pile components' sha256 are those The Pile's own download code pins for the same
files, tinyshakespeare's is the file's (the copy in the shared test data matches it), enwik8's is the one
Hugging Face ``datasets`` publishes for the same URL (``download_checksums`` of its enwik8 script, 36,445,475
bytes). ``pile_00`` has none pinned (the-eye's SHA256SUMS.txt is not reachable to check it against): its
first download is trusted and recorded in the folder's ``SHA256SUMS`` with a warning, or pinned with
``--sha256``. Downloading (resume, mirrors, checksums) is
neox/data/download.py; the eval sets (``lambada``, ``piqa``, ``wikitext2``) are neox/data/eval_sets.py, and
``prepare`` serves both.

``stdlib`` needs no download: the running Python's standard library sources, one document per ``.py``.
"""

from __future__ import annotations

import io
import os
import re
import sysconfig
import tokenize
import zipfile
from dataclasses import dataclass

from neox.data.download import MIRROR_ENV as MIRROR_ENV
from neox.data.download import Source as Source
from neox.data.download import download as download
from neox.data.download import fetch, write_jsonl
from neox.data.eval_sets import EVAL_DATA_ENV as EVAL_DATA_ENV
from neox.data.eval_sets import EVAL_SETS, prepare_eval_set
from neox.data.eval_sets import OLD_EVAL_DATA_ENV as OLD_EVAL_DATA_ENV
from neox.data.eval_sets import eval_data_dir as eval_data_dir
from neox.data.eval_sets import eval_set_for as eval_set_for
from neox.data.eval_sets import piqa_labeled as piqa_labeled
from neox.data.eval_sets import wikitext_articles as wikitext_articles
from neox.errors import DataError, NeoxError, ensure_dir

THE_EYE = "https://the-eye.eu/public/AI/pile_preliminary_components"


@dataclass(frozen=True)
class Corpus:
    name: str
    sources: tuple
    form: str  # how the download becomes JSONL: "jsonl.zst", "paragraphs" or "enwik8"
    description: str
    num_docs: int | None = None


def _c(name, form, description, *sources, num_docs=None) -> Corpus:
    return Corpus(
        name, tuple(Source(*s) if isinstance(s, tuple) else Source(s) for s in sources), form, description, num_docs
    )


CORPORA = {
    c.name: c
    for c in [
        _c(
            "enron",
            "jsonl.zst",
            "Enron emails (The Pile component), 517,401 emails",
            (
                "http://eaidata.bmk.sh/data/enron_emails.jsonl.zst",
                "6968dd2d6d9c4328ee3b77b263aad38401b77c326f693ce051c98a3f215bf583",
            ),
            num_docs=517401,
        ),
        _c(
            "tinyshakespeare",
            "paragraphs",
            "Tiny Shakespeare (char-rnn), 1.1 MB; one document per speech",
            (
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            ),
        ),
        _c(
            "enwik8",
            "enwik8",
            "enwik8: first 100 MB of an English Wikipedia XML dump; one document per <page>",
            (
                "http://mattmahoney.net/dc/enwik8.zip",
                "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
            ),
        ),
        _c(
            "europarl",
            "jsonl.zst",
            "EuroParl proceedings 1996-2011 (The Pile component)",
            (
                f"{THE_EYE}/EuroParliamentProceedings_1996_2011.jsonl.zst",
                "6111400e7b7f75ce91fed1b5fc0a3630b8263217bd01ce75f7d8701f26ac0e98",
            ),
            num_docs=69814,
        ),
        _c(
            "freelaw",
            "jsonl.zst",
            "FreeLaw court opinions (The Pile component)",
            (
                f"{THE_EYE}/FreeLaw_Opinions.jsonl.zst",
                "7d7ba907cf397e8585bb3ef148b3e9678edbf142b2247460f907c16aecbaed2d",
            ),
            num_docs=3562015,
        ),
        _c(
            "nih",
            "jsonl.zst",
            "NIH ExPORTER grant abstracts (The Pile component)",
            (
                f"{THE_EYE}/NIH_ExPORTER_awarded_grant_text.jsonl.zst",
                "be7fc69b9a3652391b6567891b99277ac99e7dfd5892ba19cb312f909357c458",
            ),
            num_docs=939661,
        ),
        _c(
            "pubmed_abstracts",
            "jsonl.zst",
            "PubMed abstracts, 2019 baseline (The Pile component)",
            (
                f"{THE_EYE}/PUBMED_title_abstracts_2019_baseline.jsonl.zst",
                "15c26a83ac2b11378b8e6ba5a16bab92428de29bacb85709834948cfcf1f029b",
            ),
            num_docs=15518009,
        ),
        _c(
            "ubuntu_irc",
            "jsonl.zst",
            "Ubuntu IRC logs until 2020-09-01 (The Pile component)",
            (
                f"{THE_EYE}/ubuntu_irc_until_2020_9_1.jsonl.zst",
                "b2bd119beb2741f428c7f1de954794718ce6e8090e3125be5e64845bb320767e",
            ),
            num_docs=2807,
        ),
        _c(
            "youtube_subtitles",
            "jsonl.zst",
            "YouTube subtitles (The Pile component)",
            (f"{THE_EYE}/yt_subs.jsonl.zst", "0b9130b8c92290eba360337fea90c2617721f65d955f785f8755cb5f4a8e319c"),
            num_docs=173651,
        ),
        _c(
            "pile_00",
            "jsonl.zst",
            "The Pile, training shard 00 of 30 (~15 GB compressed)",
            "https://the-eye.eu/public/AI/pile/train/00.jsonl.zst",
        ),
    ]
}
BUILTIN = {"stdlib": "this Python's standard library sources (no download), one document per .py file"}


def names() -> list[str]:
    return sorted([*CORPORA, *BUILTIN, *EVAL_SETS])


def description(name: str) -> str:
    if name in CORPORA:
        return CORPORA[name].description
    return BUILTIN[name] if name in BUILTIN else f"eval set: {EVAL_SETS[name].description}"


# ---- turning downloads into JSONL ------------------------------------------------------------------------------


def _decompress_zst(src: str, out_path: str) -> None:
    try:
        import zstandard
    except ImportError:
        raise NeoxError(f"{src}: reading .zst needs the zstandard package; pip install 'neox[data]'") from None
    tmp = out_path + ".tmp"
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            zstandard.ZstdDecompressor().copy_stream(fin, fout)
        os.replace(tmp, out_path)
    except zstandard.ZstdError as e:
        raise DataError(f"{src}: not a valid zstd file ({e}); delete it and run again") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def paragraphs(text: str) -> list[str]:
    """Split at blank lines, each piece keeping its trailing newlines: joined, they give back ``text``."""
    pieces = re.split(r"(?<=\n\n)(?=[^\n])", text)
    return [p for p in pieces if p]


def wiki_pages(text: str) -> list[str]:
    """Split a MediaWiki XML dump before each ``<page>``; joined, the pieces give back ``text``."""
    pieces = re.split(r"(?=^[ \t]*<page>)", text, flags=re.M)
    return [p for p in pieces if p]


def _to_jsonl(corpus: Corpus, files: list[str], out_path: str) -> None:
    if corpus.form == "jsonl.zst":
        if len(files) != 1:
            raise NeoxError(f"{corpus.name}: expected one file, got {len(files)}")
        _decompress_zst(files[0], out_path)
    elif corpus.form == "paragraphs":
        with open(files[0], encoding="utf-8") as f:
            write_jsonl(out_path, ({"text": p} for p in paragraphs(f.read())))
    elif corpus.form == "enwik8":
        try:
            with zipfile.ZipFile(files[0]) as z:
                raw = z.read("enwik8")
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{files[0]}: not the enwik8 zip ({e}); delete it and run again") from None
        # The 100 MB cut can end inside a UTF-8 sequence; replace rather than fail on it.
        write_jsonl(out_path, ({"text": p} for p in wiki_pages(raw.decode("utf-8", errors="replace"))))
    else:
        raise NeoxError(f"{corpus.name}: unknown corpus form {corpus.form!r}")


def prepare(
    name: str,
    out_dir: str,
    mirror: str | None = None,
    url: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    sha256: str | None = None,
) -> str:
    """Download (or build) corpus ``name`` into ``out_dir``; returns the path of ``out_dir/NAME.jsonl``.
    ``sha256`` replaces the expected checksum of a one-file corpus (another version of it, or one neox pins
    none for)."""
    out_path = os.path.join(out_dir, f"{name}.jsonl")
    if name == "stdlib":
        return build_stdlib_corpus(out_dir)
    if name in EVAL_SETS:
        return prepare_eval_set(name, out_dir, mirror, url, force, progress, sha256)
    if name not in CORPORA:
        raise NeoxError(f"unknown corpus {name!r}; choose one of: {', '.join(names())}")
    corpus = CORPORA[name]
    if os.path.isfile(out_path) and not force:
        return out_path
    ensure_dir(out_dir, "corpus folder")
    files = fetch(name, [(s, s.filename) for s in corpus.sources], out_dir, mirror, url, force, progress, sha256)
    _to_jsonl(corpus, files, out_path)
    return out_path


# ---- stdlib ----------------------------------------------------------------------------------------------------

# Third-party packages and the (large, repetitive) test suites are not the standard library's own code; the
# generated codec tables in encodings/ are mostly hex literals and teach a small model little but table rows.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """(relative path with "/", absolute path) of every .py under the stdlib, sorted by relative path."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in STDLIB_SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                full = os.path.join(d, f)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    return sorted(out)


def _read_source(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    except SyntaxError:
        encoding = "utf-8"
    text = raw.decode(encoding, errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


def build_stdlib_corpus(out_dir: str, root: str | None = None) -> str:
    """Write ``out_dir/stdlib.jsonl``: ``{"text", "path"}`` per stdlib .py file, in sorted path order."""
    files = stdlib_files(root)
    if not files:
        raise DataError(
            f"no .py files under {root or sysconfig.get_paths()['stdlib']}; is the standard library "
            f"source installed (some distributions ship it separately)?"
        )
    ensure_dir(out_dir, "corpus folder")
    out_path = os.path.join(out_dir, "stdlib.jsonl")
    write_jsonl(out_path, ({"text": _read_source(full), "path": rel} for rel, full in files))
    return out_path
