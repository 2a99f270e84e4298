"""The checksum sidecar (PREFIX.checksums.json): written with every dataset, checked by a sample when training
opens it and in full by `neox data verify`."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from neox.cli import main as cli
from neox.commands.data import merge_datasets
from neox.data.datasets import build_datasets, open_indexed
from neox.data.indexed import (
    IndexedDatasetBuilder,
    check_sample,
    checksum_file_path,
    sample_offsets,
    verify,
)
from neox.errors import DataError


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()
    return str(prefix)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def _sidecar(prefix):
    return json.loads(Path(checksum_file_path(prefix)).read_text())


def test_sidecar_records_sizes_and_sha256(tmp_path):
    prefix = _write(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    rec = _sidecar(prefix)
    for key in ("bin", "idx"):
        data = Path(f"{prefix}.{key}").read_bytes()
        assert rec[key]["bytes"] == len(data)
        assert rec[key]["sha256"] == hashlib.sha256(data).hexdigest()
        # a small file is one (short) block: its hash is the whole file's
        assert rec[key]["blocks"] == [[0, hashlib.sha256(data).hexdigest()]]
    assert Path(prefix + ".bin").read_bytes() == np.array([1, 2, 3, 4, 5], np.uint16).tobytes()
    assert check_sample(prefix) is True
    assert verify(prefix)[1] is True


def test_sample_offsets_hand_worked():
    assert sample_offsets(0) == []
    assert sample_offsets(10, blocks=4, block_bytes=4) == [0, 4, 8]  # covered whole
    # 100 bytes, 4 blocks of 10: first at 0, last ending at the end, evenly spaced between: span 90 / 3
    assert sample_offsets(100, blocks=4, block_bytes=10) == [0, 30, 60, 90]


def test_merge_writes_a_sidecar(tmp_path):
    a = _write(tmp_path / "a", [[1, 2]])
    b = _write(tmp_path / "b", [[3, 4, 5]])
    merged = merge_datasets([a, b], str(tmp_path / "m"))
    rec = _sidecar(merged.prefix)
    assert rec["bin"]["sha256"] == hashlib.sha256(np.array([1, 2, 3, 4, 5], np.uint16).tobytes()).hexdigest()
    assert verify(merged.prefix)[1]


def test_flipped_byte_in_a_sampled_block_fails_the_start_check(tmp_path):
    prefix = _write(tmp_path / "ds", [list(range(100)), list(range(50))])
    _flip(prefix + ".bin", 17)
    with pytest.raises(DataError, match=r"ds\.bin: the 65536-byte block at offset 0 differs .*neox preprocess"):
        check_sample(prefix)
    with pytest.raises(DataError, match=r"ds\.bin"):
        open_indexed(prefix, "data.data_path")


def test_flip_between_sampled_blocks_is_found_by_verify_only(tmp_path):
    n = 1 << 20  # 2 MiB of uint16: 16 sampled 64 KiB blocks cover half of it
    prefix = _write(tmp_path / "ds", [np.arange(n, dtype=np.int64) % 60000])
    offsets = sample_offsets(2 * n)
    gap = next(o + (1 << 16) for o, nxt in itertools.pairwise(offsets) if nxt > o + (1 << 16))
    _flip(prefix + ".bin", gap)
    assert check_sample(prefix) is True  # the sample misses it ...
    with pytest.raises(DataError, match=r"ds\.bin: sha256 differs .*corrupt"):
        verify(prefix)  # ... the full check does not


def test_changed_size_and_damaged_sidecar(tmp_path):
    prefix = _write(tmp_path / "ds", [[1, 2, 3]])
    shutil.copy(checksum_file_path(prefix), tmp_path / "keep.json")
    # another tool rewrote the pair (a consistent pair, a different size): the stale sidecar says so
    _write(tmp_path / "other", [[1, 2, 3, 4]])
    for ext in (".bin", ".idx"):
        shutil.copy(str(tmp_path / "other") + ext, prefix + ext)
    shutil.copy(tmp_path / "keep.json", checksum_file_path(prefix))
    with pytest.raises(DataError, match=r"ds\.bin: 8 bytes, but .*checksums\.json records 6"):
        check_sample(prefix)
    Path(checksum_file_path(prefix)).write_text('{"format": "neox-indexed-checksums"')
    with pytest.raises(DataError, match=r"checksums\.json: unreadable checksum file .*delete it"):
        check_sample(prefix)
    Path(checksum_file_path(prefix)).write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(DataError, match=r"checksums\.json: not a neox-indexed-checksums version 1 file"):
        verify(prefix)


def test_no_sidecar_is_a_note_not_an_error(tmp_path, capsys):
    prefix = _write(tmp_path / "ds", [[1, 2, 3]])
    Path(checksum_file_path(prefix)).unlink()  # as GPT-NeoX's own preprocessing leaves it
    assert check_sample(prefix) is False
    assert len(open_indexed(prefix, "data.data_path")) == 1
    assert "note: data.data_path:" in capsys.readouterr().err
    assert verify(prefix)[1] is False


def test_verify_checks_doc_idx_ends(tmp_path):
    prefix = _write(tmp_path / "ds", [[1, 2], [3]])
    idx = bytearray(Path(prefix + ".idx").read_bytes())
    idx[-8:] = (1).to_bytes(8, "little")  # doc_idx [0, 1, 1]: the last item belongs to no document
    Path(prefix + ".idx").write_bytes(bytes(idx))
    Path(checksum_file_path(prefix)).unlink()
    with pytest.raises(DataError, match=r"ds\.idx: doc_idx should run from 0 to the item count 2, but is 0 \.\. 1"):
        verify(prefix)


def test_cli_verify(tmp_path, capsys):
    prefix = _write(tmp_path / "ds", [[1, 2, 3], [4]])
    assert cli(["data", "verify", prefix + ".bin"]) == 0
    out = capsys.readouterr().out
    assert "2 documents, 4 tokens; structure and sha256 match" in out
    _flip(prefix + ".idx", 40)
    assert cli(["data", "verify", prefix]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ds.idx" in err


def test_training_start_checks_the_sample(tmp_path):
    prefix = _write(tmp_path / "ds", [list(range(40)) for _ in range(10)])
    data = SimpleNamespace(
        data_path=prefix,
        mmap_warmup=False,
        split="8,1,1",
        data_cache_dir=str(tmp_path / "cache"),
        pack_impl="packed",
        allow_chopped=True,
        train_data_paths=[],
        valid_data_paths=[],
        test_data_paths=[],
        label_data_paths=[],
        valid_label_data_paths=[],
        test_label_data_paths=[],
    )
    assert build_datasets(data, 16, 1, (4, 2, 2))[0] is not None
    _flip(prefix + ".bin", 500)
    with pytest.raises(DataError, match=r"ds\.bin: the 65536-byte block at offset 0 differs"):
        build_datasets(data, 16, 1, (4, 2, 2))
