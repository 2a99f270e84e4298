"""Input files for preprocessing and tokenizer training: JSONL and plain text, optionally .gz / .zst.

Files are streamed line by line, so memory does not grow with the corpus. JSONL lines stay raw bytes here;
they are decoded and parsed where they are tokenized (in the worker processes), so that the reading process
does as little as possible.

How plain text becomes documents (``text_mode``):
- ``file`` (default, as GPT-NeoX's lm_dataformat reader does): the whole file is one document;
- ``paragraph``: runs of non-blank lines separated by blank lines, each run one document;
- ``line``: every non-blank line is one document (its newline dropped).

A ``.json`` file is read as JSON Lines unless it starts with ``[``: then it is one array whose strings are
documents and whose objects are read like JSON lines (GPT-NeoX's lm_dataformat accepts such files).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from neox.errors import DataError

TEXT_MODES = ("file", "paragraph", "line")
_JSONL_EXTS = (".jsonl", ".json", ".ndjson")


def expand_inputs(spec) -> list[str]:
    """Comma-separated paths (GPT-NeoX style), lists of them, globs and directories -> sorted file list."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise DataError("--input: no input files given")
    files: list[str] = []
    for p in parts:
        if any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"--input: {p}: the pattern matches no files")
            files.extend(found)
        elif os.path.isdir(p):
            found = sorted(
                os.path.join(p, f) for f in os.listdir(p) if os.path.isfile(os.path.join(p, f)) and _kind(f) is not None
            )
            if not found:
                raise DataError(f"--input: {p}: the directory holds no .jsonl/.txt (.gz/.zst) files")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"--input: {p}: no such file")
    for f in files:
        if _kind(f) is None:
            raise DataError(f"{f}: unknown input type; use .jsonl, .json, .txt (optionally .gz or .zst)")
    return files


def _strip_compression(name: str) -> str:
    for ext in (".gz", ".zst"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _kind(name: str) -> str | None:
    base = _strip_compression(name.lower())
    if base.endswith(_JSONL_EXTS):
        return "jsonl"
    if base.endswith(".txt") or base.endswith(".text"):
        return "text"
    return None


def is_jsonl(path: str) -> bool:
    return _kind(path) == "jsonl"


def open_binary(path: str):
    """The file's decompressed bytes as a buffered binary stream."""
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.endswith(".zst"):
            import zstandard

            raw = open(path, "rb")
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
        return open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None


def _guarded(path: str, chunks):
    """Pass chunks through, turning a corrupt compressed stream into a DataError naming the file."""
    try:
        yield from chunks
    except (OSError, EOFError, ValueError) as e:
        # gzip raises BadGzipFile/EOFError, zstandard ZstdError (a ValueError subclass in practice) or OSError
        raise DataError(f"{path}: corrupt or truncated compressed data ({e})") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{path}: corrupt or truncated zstd data ({e})") from None
        raise


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line bytes) for every line."""

    def lines():
        with open_binary(path) as f:
            yield from enumerate(f, 1)

    return _guarded(path, lines())


def iter_json_lines(inputs) -> Iterator[tuple[str, object, bytes]]:
    """("file:line", parsed value, raw bytes) of every non-blank line of the JSON Lines files `inputs` names
    (expanded as --input is). A line that does not parse is a one-line DataError naming the file and line."""
    for path in expand_inputs(inputs):
        for n, raw in iter_lines(path):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                value = json.loads(raw)
            except ValueError as e:
                raise DataError(f"{where}: {json_line_error(e)}") from None
            yield where, value, raw


def iter_blocks(path: str, block_bytes: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(line number of its first line, bytes) for blocks of about block_bytes that end at a line end."""

    def blocks():
        lineno = 1
        with open_binary(path) as f:
            while block := f.read(block_bytes):
                if not block.endswith(b"\n"):
                    block += f.readline()
                yield lineno, block
                lineno += block.count(b"\n")

    return _guarded(path, blocks())


@dataclass
class Piece:
    """One unit of work: a JSONL line (raw bytes) or a text segment (str).

    A plain-text document longer than the segment size arrives as several pieces; ``last`` marks the piece
    that ends its document.
    """

    path: str
    line: int
    data: object
    is_json: bool
    last: bool = True


def json_line_error(e: ValueError) -> str:
    """Why one JSON line did not parse, placed within that line. The caller prints the file's line number
    beside it, so json's own "line 1 column 10 (char 9)" (or "line 2 column 1" when the line ends too early)
    would only repeat or contradict it."""
    if not isinstance(e, json.JSONDecodeError):
        return f"bad JSON ({e})"
    if e.lineno > 1 or e.pos >= len(e.doc.rstrip()):
        return f"bad JSON: {e.msg.removesuffix(' at')} at the end of the line (one whole JSON object per line)"
    return f"bad JSON: {_where(e)}"


def _where(e: json.JSONDecodeError) -> str:
    # json's messages either end in " at" ("Unterminated string starting at") or want one
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


@dataclass
class BadLine:
    """A line that was skipped, with where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


# Where a document may be cut for a splittable tokenizer: between "X\n" and "Y", X and Y not whitespace.
# No byte-level BPE pre-token crosses such a point, and a lone trailing "\n" tokenizes the same at the end of
# a piece as in the middle of the document (a longer trailing whitespace run would not).
_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _safe_cut(prev: str, nxt: str) -> bool:
    """True when a cut between line ``prev`` and line ``nxt`` is a _CUT point."""
    return len(prev) >= 2 and prev[-1] == "\n" and not prev[-2].isspace() and nxt[:1] != "" and not nxt[0].isspace()


def _decode_block(path: str, first: int, block: bytes, bad: list) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        pass
    good = []
    for i, raw in enumerate(block.splitlines(keepends=True)):
        try:
            good.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad.append(BadLine(path, first + i, f"invalid UTF-8 at byte {e.start}"))
    return "".join(good)


def _file_pieces(path: str, segment_chars: int, splittable: bool, bad: list) -> Iterator[Piece]:
    # Whole-file documents are read in blocks rather than lines: far less Python work per byte.
    pending, start, scan = "", 1, segment_chars
    for first, block in iter_blocks(path, max(segment_chars, 1 << 16)):
        pending += _decode_block(path, first, block, bad)
        while splittable and len(pending) >= segment_chars:
            m = _CUT.search(pending, scan)
            if m is None:
                scan = max(len(pending), segment_chars)  # text without cut points is not scanned twice
                break
            head, pending = pending[: m.start()], pending[m.start() :]
            yield Piece(path, start, head, False, last=False)
            start += head.count("\n")
            scan = segment_chars
    if pending:
        yield Piece(path, start, pending, False)


def iter_text_pieces(path: str, mode: str, segment_chars: int, splittable: bool, bad: list) -> Iterator[Piece]:
    """Documents of a plain-text file as Pieces; lines that are not valid UTF-8 are skipped into ``bad``."""
    if mode not in TEXT_MODES:
        raise DataError(f"--text-mode: {mode!r} is not one of {', '.join(TEXT_MODES)}")
    if mode == "file":
        yield from _file_pieces(path, segment_chars, splittable, bad)
        return
    buf: list[str] = []
    size = 0
    start = 0
    for lineno, raw in iter_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadLine(path, lineno, f"invalid UTF-8 at byte {e.start}"))
            continue
        if mode == "line":
            text = line.rstrip("\r\n")
            if text.strip():
                yield Piece(path, lineno, text, False)
            continue
        if not line.strip():
            if buf:
                yield Piece(path, start, "".join(buf), False)
                buf, size = [], 0
            continue
        if not buf:
            start = lineno
        elif splittable and size >= segment_chars and _safe_cut(buf[-1], line):
            # A long paragraph leaves in segments so several workers can encode it at once.
            yield Piece(path, start, "".join(buf), False, last=False)
            buf, size, start = [], 0, lineno
        buf.append(line)
        size += len(line)
    if buf:
        yield Piece(path, start, "".join(buf), False)


def iter_pieces(
    paths: list[str],
    text_mode: str = "file",
    segment_chars: int = 1 << 16,
    splittable: bool = True,
    bad: list | None = None,
) -> Iterator[Piece]:
    """All pieces of all files in order. Blank JSONL lines are skipped silently."""
    bad = [] if bad is None else bad
    for path in paths:
        if not is_jsonl(path):
            yield from iter_text_pieces(path, text_mode, segment_chars, splittable, bad)
        elif _starts_with(path, b"["):
            yield from _json_array_pieces(path)
        else:
            for lineno, raw in iter_lines(path):
                if raw.strip():
                    yield Piece(path, lineno, raw, True)


def _starts_with(path: str, char: bytes) -> bool:
    def head():
        with open_binary(path) as f:
            yield f.read(4096)

    return next(_guarded(path, head())).lstrip()[:1] == char


def _json_array_pieces(path: str) -> Iterator[Piece]:
    # A .json file holding one array (what GPT-NeoX's lm_dataformat reader accepts): strings are documents,
    # objects are read like JSON lines. It is parsed whole; JSON Lines is the format that streams. Pieces are
    # numbered by their position in the array (reported as "file:N").
    def whole():
        with open_binary(path) as f:
            yield f.read()

    raw = next(_guarded(path, whole()))  # a truncated .json.gz is a DataError, not an EOFError
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: not valid JSON ({_where(e)}); use one JSON object per line (.jsonl)"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); use one JSON object per line (.jsonl)") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to parse; use one JSON object per line (.jsonl)") from None
    for n, item in enumerate(items, 1):
        if isinstance(item, str):
            if item:
                yield Piece(path, n, item, False)
        else:
            yield Piece(path, n, json.dumps(item).encode("utf-8"), True)
