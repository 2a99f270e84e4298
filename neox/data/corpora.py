"""Named corpora: where to download them, their checksums, and how each becomes ``NAME.jsonl``.

The registry follows GPT-NeoX's ``tools/datasets/corpora.py`` (names and URLs); sha256 checksums are those
The Pile's own download code pins for the same files, and None where no published checksum is known (the
download then prints the sha256 it got so it can be pinned). Downloads resume: bytes go to ``FILE.part`` and
a rerun asks the server for the rest with an HTTP Range request. ``mirror`` (or ``NEOX_CORPUS_MIRROR``)
replaces every URL's directory, so air-gapped sites and tests can serve the same file names locally.

``stdlib`` needs no download: the running Python's standard library sources, one document per ``.py``.

Eval sets (``lambada``, ``piqa``, ``wikitext2``) are the data the bundled local lm-eval tasks read. They go to the
eval data folder (``NEOX_EVAL_DATA``, else ``~/.cache/neox/eval-data``) under fixed relative paths, and the
files built from the downloads (PIQA with its labels, WikiText-2 split into articles) are checksummed too.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import itertools
import json
import os
import re
import sys
import sysconfig
import tokenize
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass

from neox.errors import DataError, NeoxError, ensure_dir

MIRROR_ENV = "NEOX_CORPUS_MIRROR"
EVAL_DATA_ENV = "NEOX_EVAL_DATA"
# the variable's name before the eval data folder had a default; still read so existing setups keep working
OLD_EVAL_DATA_ENV = "NEOX_SHARED_DATA"
THE_EYE = "https://the-eye.eu/public/AI/pile_preliminary_components"


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlparse(self.url).path)


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
            "http://mattmahoney.net/dc/enwik8.zip",
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


def names() -> list[str]:
    return sorted([*CORPORA, *BUILTIN, *EVAL_SETS])


def description(name: str) -> str:
    if name in CORPORA:
        return CORPORA[name].description
    return BUILTIN[name] if name in BUILTIN else f"eval set: {EVAL_SETS[name].description}"


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


def source_url(source: Source, mirror: str | None) -> str:
    """The URL to fetch: the registry's, or the same file name under ``mirror``."""
    if not mirror:
        return source.url
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(source.filename)}"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _progress(total: int | None, initial: int, name: str, show: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if show is None else show
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def download(
    url: str, dest: str, sha256: str | None = None, progress: bool | None = None, timeout: float = 60.0
) -> str:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a partial file; verify ``sha256``.

    A finished ``dest`` is not fetched again. A server that ignores the Range request makes the download
    start over. On a checksum mismatch the bad bytes are deleted and a DataError says so.
    """
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "neox-prepare"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is already whole
            return _finish(part, dest, url, sha256)
        raise DataError(
            f"{url}: HTTP {e.code} {e.reason}; check the URL or pass --mirror/--url "
            f"(or set {MIRROR_ENV}) to fetch from another server"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"{url}: cannot connect ({reason}); without network, pass --mirror/--url (or set "
            f"{MIRROR_ENV}) to a server that has {os.path.basename(dest)}"
        ) from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server sent the whole file; start again from byte 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        got = have
        bar = _progress(total, have, os.path.basename(dest), progress)
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise DataError(
                f"{url}: download interrupted after {got} bytes ({e}); run the same command again to resume from {part}"
            ) from None
        finally:
            bar.close()
    if total is not None and got < total:
        raise DataError(
            f"{url}: connection closed after {got} of {total} bytes; run the same command again to resume from {part}"
        )
    return _finish(part, dest, url, sha256)


def _finish(part: str, dest: str, url: str, sha256: str | None) -> str:
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256.lower():
        os.remove(part)
        raise DataError(
            f"{url}: sha256 {digest} does not match the expected {sha256}; the download was deleted. "
            f"Run again, or use --mirror/--url pointing at a correct copy"
        )
    if sha256 is None:
        print(f"{os.path.basename(dest)}: sha256 {digest} (no published checksum to verify against)", file=sys.stderr)
    os.replace(part, dest)
    return dest


# ---- turning downloads into JSONL ------------------------------------------------------------------------------


def _write_jsonl(out_path: str, docs) -> int:
    """Write ``{"text": ...}`` documents atomically; returns how many."""
    tmp = out_path + ".tmp"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False))
                f.write("\n")
                n += 1
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


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


def _to_jsonl(corpus: Corpus, files: list[str], out_path: str) -> None:
    if corpus.form == "jsonl.zst":
        if len(files) != 1:
            raise NeoxError(f"{corpus.name}: expected one file, got {len(files)}")
        _decompress_zst(files[0], out_path)
    elif corpus.form == "paragraphs":
        with open(files[0], encoding="utf-8") as f:
            _write_jsonl(out_path, ({"text": p} for p in paragraphs(f.read())))
    elif corpus.form == "enwik8":
        try:
            with zipfile.ZipFile(files[0]) as z:
                raw = z.read("enwik8")
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{files[0]}: not the enwik8 zip ({e}); delete it and run again") from None
        # The 100 MB cut can end inside a UTF-8 sequence; replace rather than fail on it.
        _write_jsonl(out_path, ({"text": p} for p in wiki_pages(raw.decode("utf-8", errors="replace"))))
    else:
        raise NeoxError(f"{corpus.name}: unknown corpus form {corpus.form!r}")


def prepare(
    name: str,
    out_dir: str,
    mirror: str | None = None,
    url: str | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> str:
    """Download (or build) corpus ``name`` into ``out_dir``; returns the path of ``out_dir/NAME.jsonl``."""
    out_path = os.path.join(out_dir, f"{name}.jsonl")
    if name == "stdlib":
        return build_stdlib_corpus(out_dir)
    if name in EVAL_SETS:
        return prepare_eval_set(name, out_dir, mirror, url, force, progress)
    if name not in CORPORA:
        raise NeoxError(f"unknown corpus {name!r}; choose one of: {', '.join(names())}")
    corpus = CORPORA[name]
    if os.path.isfile(out_path) and not force:
        return out_path
    ensure_dir(out_dir, "corpus folder")
    files = _fetch(name, [(s, s.filename) for s in corpus.sources], out_dir, mirror, url, force, progress)
    _to_jsonl(corpus, files, out_path)
    return out_path


def _fetch(name: str, files: list, out_dir: str, mirror, url, force: bool, progress) -> list[str]:
    """Download each (Source, path under out_dir); returns the local paths. ``url`` replaces the one source's
    URL (keeping its checksum: it must be the same file); ``mirror`` replaces every URL's directory."""
    if url:
        if len(files) != 1:
            raise NeoxError(f"--url: {name} has {len(files)} files; use --mirror for it")
        files = [(Source(url, files[0][0].sha256), files[0][1])]
    mirror = None if url else mirror or os.environ.get(MIRROR_ENV) or None
    paths = []
    for src, rel in files:
        dest = os.path.join(out_dir, rel)
        if force:
            for stale in (dest, dest + ".part"):
                if os.path.isfile(stale):
                    os.remove(stale)
        paths.append(download(source_url(src, mirror), dest, src.sha256, progress))
    return paths


def prepare_eval_set(
    name: str,
    out_dir: str,
    mirror: str | None = None,
    url: str | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> str:
    """Download eval set ``name`` into the eval data folder ``out_dir`` (and build its derived file); returns
    the path of the file the tasks read (the built one, else the download)."""
    spec = EVAL_SETS[name]
    ensure_dir(out_dir, "eval data folder")
    files = _fetch(name, list(spec.downloads), out_dir, mirror, url, force, progress)
    if not spec.built:
        return files[0]
    rel, sha256 = spec.built
    out_path = os.path.join(out_dir, rel)
    if os.path.isfile(out_path) and not force:
        return out_path
    _write_jsonl(out_path, _EVAL_BUILDERS[name](files))
    digest = sha256_of(out_path)
    if digest != sha256:
        os.remove(out_path)
        raise DataError(f"{out_path}: built with sha256 {digest}, expected {sha256}; run with -f to download again")
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
    _write_jsonl(out_path, ({"text": _read_source(full), "path": rel} for rel, full in files))
    return out_path
