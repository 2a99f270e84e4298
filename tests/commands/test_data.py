"""`neox data inspect` and `neox data merge` (and the GPT-NeoX merge_datasets.py shim)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neox.cli import main as cli
from neox.commands.data import length_histogram, merge_datasets, merge_inputs
from neox.data.indexed import IndexedDataset, IndexedDatasetBuilder
from neox.errors import DataError, NeoxError

ROOT = Path(__file__).resolve().parents[2]
EOD = 256  # ByteLevelTokenizer


def _write(prefix, texts, dtype=np.uint16, eod=True):
    b = IndexedDatasetBuilder(str(prefix), dtype)
    for t in texts:
        b.add_document(list(t.encode()) + ([EOD] if eod else []))
    b.finalize()
    return str(prefix)


def test_histogram_buckets():
    lines = length_histogram(np.array([0, 1, 3, 3, 9]), width=4)
    assert [ln.split()[:3] for ln in lines] == [
        ["0", "1", "##"],
        ["[1,", "2)", "1"],
        ["[2,", "4)", "2"],
        ["[4,", "8)", "0"],
        ["[8,", "16)", "1"],
    ]
    assert lines[2].endswith("####")


def test_inspect_counts_documents_and_samples(tmp_path, capsys):
    prefix = _write(tmp_path / "ds", ["hello world", "second doc", "x" * 40])
    rc = cli(
        [
            "data",
            "inspect",
            prefix,
            "--tokenizer-type",
            "ByteLevelTokenizer",
            "--doc",
            "1",
            "--doc",
            "-1",
            "--sample",
            "0",
            "--seq-length",
            "8",
            "--max-chars",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "dtype     uint16" in out
    assert "documents 3   items 3   tokens 64" in out
    assert "documents ending in EOD (256): 3 of 3" in out
    assert "[8, 16)" in out and "[32, 64)" in out
    assert "--- document 1 (11 tokens) ---\nsecond doc" in out
    assert "--- document -1 (41 tokens) ---\nxxxxxxxxxx... [30 more chars]" in out
    assert "--- sample 0 (seq_length 8, seed 1234, documents" in out
    assert not list(tmp_path.glob("*.npy"))  # sample index caches go to a temporary directory
    rc = cli(["data", "inspect", prefix + ".idx", "--doc", "0"])  # no tokenizer: ids
    assert rc == 0 and "104 101 108 108 111 32" in capsys.readouterr().out
    # a --doc or --sample that cannot be shown is the only output: no statistics printed first
    for bad, named in (
        ("--doc 7", "has 3 documents (give 0 to 2, or -1 for the last)"),
        ("--doc -4", "--doc -4"),
        ("--sample -1", "--sample"),
        ("--sample 0 --seq-length 0", "--seq-length 0"),
    ):
        assert cli(["data", "inspect", prefix, "--doc", "0", *bad.split()]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and named in err, (out, err)
    assert cli(["data", "inspect", str(tmp_path / "absent")]) == 2
    assert "absent.idx: no such file" in capsys.readouterr().err


def test_merge_directory_and_prefixes(tmp_path, capsys):
    d = tmp_path / "parts"
    a = _write(d / "a", ["one", "two"])
    b = _write(d / "b", ["three"])
    assert merge_inputs([str(d)]) == [a, b]
    assert cli(["data", "merge", "--input", str(d), "--output-prefix", str(tmp_path / "all")]) == 0
    assert "2 datasets" in capsys.readouterr().out
    merged = IndexedDataset(str(tmp_path / "all"))
    assert [bytes(merged[i][:-1].tolist()).decode() for i in range(3)] == ["one", "two", "three"]
    assert merged.doc_idx.tolist() == [0, 1, 2, 3]
    again = merge_datasets([b, a + ".bin"], str(tmp_path / "ba"))  # explicit order, .bin paths accepted
    assert again[0].tolist()[:-1] == list(b"three")
    # GPT-NeoX's tool, same command line, at its path (and at neox's older one)
    for tool in ("tools/datasets/merge_datasets.py", "tools/merge_datasets.py"):
        shim = tmp_path / tool.replace("/", "_")
        res = subprocess.run(
            [sys.executable, str(ROOT / tool), "--input", str(d), "--output-prefix", str(shim)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert Path(f"{shim}.bin").read_bytes() == (tmp_path / "all.bin").read_bytes()
        assert Path(f"{shim}.idx").read_bytes() == (tmp_path / "all.idx").read_bytes()


def test_merge_errors(tmp_path):
    d = tmp_path / "parts"
    a = _write(d / "a", ["one"])
    _write(tmp_path / "wide", ["two"], dtype=np.int32)
    with pytest.raises(NeoxError, match="dtype int32 differs"):
        merge_datasets([a, str(tmp_path / "wide")], str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))  # nothing half-written is left
    with pytest.raises(NeoxError, match="is also an input"):
        merge_datasets([a], a)
    (d / "lonely.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"lonely\.idx: missing"):
        merge_inputs([str(d)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .bin/.idx datasets"):
        merge_inputs([str(tmp_path / "empty")])
