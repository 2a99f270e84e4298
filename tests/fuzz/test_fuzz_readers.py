"""Fuzz the corpus readers (neox/data/readers.py) and the JSON-line parsing of preprocessing: any bytes in any
input kind give documents, skipped lines (BadLine) or a one-line DataError, never another exception."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from neox.data.preprocess import _texts_of
from neox.data.readers import BadLine, Piece, expand_inputs, iter_pieces
from tests.fuzz.common import fuzz, only_neox_errors

READER_CASES = 500

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["text", "prompt", "x"]), inner),
    max_leaves=8,
)
_json_line = _json_values.map(lambda v: json.dumps(v).encode())
_line = st.one_of(
    _json_line,
    _json_line.map(lambda b: b[: len(b) // 2]),  # cut short: broken JSON
    st.binary(max_size=60),  # anything, invalid UTF-8 included
    st.sampled_from([b"", b"\r", b"\xff\xfe", b'{"text": "\xc3"}', b"[", b"\x00", b'{"text": "a"}\r']),
    st.integers(1, 2).map(lambda k: b'{"text": "' + b"y" * (70_000 * k) + b'"}'),  # huge lines
    st.integers(1, 3).map(lambda k: b"[" * (10_000 * k)),  # nested past the parser's recursion limit
)
_content = st.lists(_line, max_size=12).map(lambda lines: b"\n".join(lines))
_kinds = st.sampled_from([".jsonl", ".json", ".txt", ".jsonl.gz", ".txt.gz"])


def _read_all(path: str, mode: str, segment: int) -> None:
    bad: list = []
    for piece in iter_pieces([path], mode, segment_chars=segment, splittable=True, bad=bad):
        assert isinstance(piece, Piece)
        if piece.is_json:
            texts = _texts_of(piece, ["text"], "prompt" if segment % 2 else None)
            assert isinstance(texts, BadLine) or all(isinstance(t, str) for t in texts)
        else:
            assert isinstance(piece.data, str)
    assert all(isinstance(b, BadLine) and "\n" not in str(b) for b in bad)


@fuzz(READER_CASES)
@given(
    content=_content,
    kind=_kinds,
    mode=st.sampled_from(["file", "paragraph", "line"]),
    segment=st.integers(1, 1 << 17),
    cut=st.none() | st.integers(0, 200),
)
def test_readers_only_raise_data_errors(content, kind, mode, segment, cut):
    if kind.endswith(".gz"):
        content = gzip.compress(content)
        if cut is not None:
            content = content[:cut]  # a truncated or garbled compressed stream
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / f"in{kind}")
        Path(path).write_bytes(content)
        with only_neox_errors():
            assert expand_inputs(path) == [path]
            _read_all(path, mode, segment)
