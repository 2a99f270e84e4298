"""How input files become pieces: cut points, line numbers, and documents without cut points."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from neox.data.readers import iter_json_lines, iter_pieces, iter_text_pieces, json_line_error
from neox.errors import DataError


def test_cuts_only_between_non_space_line_ends(tmp_path):
    text = "alpha\n  beta\ngamma  \ndelta\n\nepsilon\nzeta\n"
    (tmp_path / "t.txt").write_text(text)
    pieces = list(iter_text_pieces(str(tmp_path / "t.txt"), "file", 1, True, []))
    # allowed cuts: before "  beta"? no (next starts with space); before "delta"? no ("  \n" before it);
    # before "epsilon"? no (blank line); before "gamma" and "zeta": yes
    assert [p.data for p in pieces] == ["alpha\n  beta\n", "gamma  \ndelta\n\nepsilon\n", "zeta\n"]
    assert [p.line for p in pieces] == [1, 3, 7]
    assert [p.last for p in pieces] == [False, False, True]
    whole = list(iter_text_pieces(str(tmp_path / "t.txt"), "file", 1, False, []))  # not splittable
    assert [p.data for p in whole] == [text]


def test_long_paragraphs_are_cut_too(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n\nd\n")
    pieces = list(iter_text_pieces(str(tmp_path / "p.txt"), "paragraph", 2, True, []))
    assert [(p.data, p.line, p.last) for p in pieces] == [
        ("a\n", 1, False),
        ("b\n", 2, False),
        ("c\n", 3, True),
        ("d\n", 5, True),
    ]


def test_document_without_cut_points_is_read_in_linear_time(tmp_path):
    (tmp_path / "one_line.txt").write_text("word " * 400_000)  # 2 MB, no newline at all
    t0 = time.perf_counter()
    pieces = list(iter_pieces([str(tmp_path / "one_line.txt")], "file", 1000, True))
    assert len(pieces) == 1 and len(pieces[0].data) == 2_000_000
    assert time.perf_counter() - t0 < 5


def test_jsonl_lines_stay_raw_with_their_numbers(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "x"}\n\n  \n{"text": "y"}\n')
    pieces = list(iter_pieces([str(tmp_path / "a.jsonl")]))
    assert [(p.line, p.data, p.is_json) for p in pieces] == [
        (1, b'{"text": "x"}\n', True),
        (4, b'{"text": "y"}\n', True),
    ]


def test_json_array_files(tmp_path):
    (tmp_path / "arr.json").write_text(' [ "doc one", "", {"text": "doc two"}, 5 ]')
    pieces = list(iter_pieces([str(tmp_path / "arr.json")]))
    assert [(p.line, p.data, p.is_json) for p in pieces] == [
        (1, "doc one", False),
        (3, b'{"text": "doc two"}', True),
        (4, b"5", True),
    ]
    (tmp_path / "broken.json").write_text('["unterminated')
    with pytest.raises(DataError, match=r"broken\.json:1: not valid JSON \(Unterminated string starting at column 2\)"):
        list(iter_pieces([str(tmp_path / "broken.json")]))


def _json_error(line: str) -> str:
    try:
        json.loads(line)
    except ValueError as e:
        return json_line_error(e)
    raise AssertionError(f"{line!r} parsed")


def test_json_line_errors_are_placed_within_the_line():
    # the caller prints the file's line number; json's "line 1 column 10 (char 9)" / "line 2 column 1" must not
    # appear beside it. Columns counted by hand (1-based).
    assert _json_error('{"text": broken}\n') == "bad JSON: Expecting value at column 10"
    assert _json_error('{"a": 1} x\n') == "bad JSON: Extra data at column 10"
    assert _json_error('{"text": "abc') == "bad JSON: Unterminated string starting at column 10"
    # the object goes on past the line (pretty-printed JSON in a .jsonl)
    end = "at the end of the line (one whole JSON object per line)"
    assert _json_error('{"text": "x"\n') == f"bad JSON: Expecting ',' delimiter {end}"
    assert _json_error("{\n") == f"bad JSON: Expecting property name enclosed in double quotes {end}"
    assert _json_error('{"text": "abc\n') == f"bad JSON: Invalid control character {end}"
    for line in ('{"text": broken}\n', '{"text": "x"\n', "{\n"):
        assert "line " not in _json_error(line).replace("of the line", "")


def test_json_lines_of_several_files_skip_blanks_and_name_a_bad_line(tmp_path):
    """The line loop chat and preference preprocessing share: compressed files too, blank lines skipped."""
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n[2]\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('"three"\n{"x": \n')
    records = iter_json_lines([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")])
    assert [next(records) for _ in range(3)] == [
        (f"{tmp_path / 'a.jsonl'}:1", {"x": 1}, b'{"x": 1}\n'),
        (f"{tmp_path / 'a.jsonl'}:3", [2], b"[2]\n"),
        (f"{tmp_path / 'b.jsonl.gz'}:1", "three", b'"three"\n'),
    ]
    with pytest.raises(DataError, match=r"b\.jsonl\.gz:2: bad JSON: .* at the end of the line"):
        next(records)
