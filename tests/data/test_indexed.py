"""The .bin/.idx format, byte for byte, and every way a pair can be broken."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from neox.data.indexed import (
    DTYPES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
)
from neox.errors import DataError, NeoxError

DOCS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]


def _write(prefix, docs, dtype):
    b = IndexedDatasetBuilder(str(prefix), dtype)
    for d in docs:
        b.add_item(d)
        b.end_document()
    b.finalize()
    return str(prefix)


def _le(n, width):
    return n.to_bytes(width, "little")


def test_uint16_exact_bytes(tmp_path):
    prefix = _write(tmp_path / "ds", DOCS, np.uint16)
    idx = (tmp_path / "ds.idx").read_bytes()
    # Header: magic, version 1 (<Q), dtype code 8 = uint16 (<B), 3 items (<Q), 4 doc_idx entries (<Q).
    header = b"MMIDIDX\x00\x00" + _le(1, 8) + bytes([8]) + _le(3, 8) + _le(4, 8)
    sizes = _le(4, 4) + _le(3, 4) + _le(5, 4)
    pointers = _le(0, 8) + _le(8, 8) + _le(14, 8)  # byte offsets: 4 and 3 tokens of 2 bytes each
    doc_idx = _le(0, 8) + _le(1, 8) + _le(2, 8) + _le(3, 8)
    assert len(idx) == 102
    assert idx[:34] == header
    assert idx[34:46] == sizes
    assert idx[46:70] == pointers
    assert idx[70:102] == doc_idx
    assert idx == header + sizes + pointers + doc_idx
    assert (tmp_path / "ds.bin").read_bytes() == b"".join(_le(t, 2) for d in DOCS for t in d)

    ds = IndexedDataset(prefix)
    assert len(ds) == 3 and ds.dtype == np.uint16
    assert ds.sizes.tolist() == [4, 3, 5]
    assert ds.pointers.tolist() == [0, 8, 14]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3]
    assert [ds[i].tolist() for i in range(3)] == DOCS
    assert ds[-1].tolist() == DOCS[2]
    assert ds.get(2, offset=1, length=3).tolist() == [9, 10, 11]
    assert ds.get(0, offset=2).tolist() == [3, 4]
    assert [a.tolist() for a in ds[1:3]] == DOCS[1:]
    assert ds.num_tokens == 12 and ds.num_documents == 3


def test_int32_exact_bytes_for_large_vocab(tmp_path):
    assert best_fitting_dtype(50277) == np.uint16
    assert best_fitting_dtype(65500) == np.int32 and best_fitting_dtype(None) == np.int32
    docs = [[70000, 1], [100277]]
    _write(tmp_path / "big", docs, best_fitting_dtype(100277))
    idx = (tmp_path / "big.idx").read_bytes()
    assert idx[17] == 4  # int32
    assert idx[34:42] == _le(2, 4) + _le(1, 4)
    assert idx[42:58] == _le(0, 8) + _le(8, 8)
    assert (tmp_path / "big.bin").read_bytes() == _le(70000, 4) + _le(1, 4) + _le(100277, 4)
    assert IndexedDataset(str(tmp_path / "big"))[0].tolist() == [70000, 1]


def test_dtype_table_is_gpt_neox():
    assert {c: np.dtype(t).name for c, t in DTYPES.items()} == {
        1: "uint8",
        2: "int8",
        3: "int16",
        4: "int32",
        5: "int64",
        6: "float32",
        7: "float64",
        8: "uint16",
    }


def test_zero_copy_readonly_and_pickle(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "ds", DOCS, np.uint16))
    item = ds[1]
    assert not item.flags.owndata and not item.flags.writeable
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2].tolist() == DOCS[2]


def test_multi_item_documents_and_empty_dataset(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.int32)  # a .bin path is accepted as the prefix too
    b.add_item([1, 2])
    b.add_item([3])
    b.end_document()
    b.add_documents(np.array([4, 5, 6]), [1, 2])
    b.finalize()
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.doc_idx.tolist() == [0, 2, 3, 4] and ds.sizes.tolist() == [2, 1, 1, 2]
    assert ds[3].tolist() == [5, 6]
    _write(tmp_path / "empty", [], np.uint16)
    empty = IndexedDataset(str(tmp_path / "empty"))
    assert len(empty) == 0 and empty.doc_idx.tolist() == [0]


def test_merge_keeps_documents(tmp_path):
    a = _write(tmp_path / "a", DOCS[:2], np.uint16)
    b = _write(tmp_path / "b", DOCS[2:], np.uint16)
    out = IndexedDatasetBuilder(str(tmp_path / "ab"), np.uint16)
    out.merge_file_(a)
    out.merge_file_(b)
    out.finalize()
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.doc_idx.tolist() == [0, 1, 2, 3]
    _write(tmp_path / "ref", DOCS, np.uint16)
    assert (tmp_path / "ab.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    c = _write(tmp_path / "c", DOCS, np.int32)
    with pytest.raises(NeoxError, match="dtype int32 differs"):
        IndexedDatasetBuilder(str(tmp_path / "bad"), np.uint16).merge_file_(c)


def test_atomic_output_and_abort(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "t"), np.uint16)
    b.add_item([1, 2])
    assert not (tmp_path / "t.bin").exists()  # only the .tmp exists until finalize
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(str(tmp_path / "u"), np.uint16) as u:
        u.add_item([1])
        raise RuntimeError("boom")
    assert list(tmp_path.glob("u*")) == []


def test_value_out_of_range(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "r"), np.uint16)
    with pytest.raises(NeoxError, match="token id 70000 does not fit uint16"):
        b.add_item(np.array([1, 70000], dtype=np.int64))
    with pytest.raises(NeoxError, match="cannot be stored"):
        IndexedDatasetBuilder(str(tmp_path / "s"), np.complex64)


# --- broken pairs: each fails at open with the file's name --------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx: no such file"):
        IndexedDataset(str(tmp_path / "nope"))
    prefix = _write(tmp_path / "ds", DOCS, np.uint16)
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(DataError, match=r"ds\.bin: no such file"):
        IndexedDataset(prefix)


def test_truncated_bin(tmp_path):
    prefix = _write(tmp_path / "ds", DOCS, np.uint16)
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"ds\.bin: 22 bytes, but .*ds\.idx describes 24 \(truncated \.bin\)"):
        IndexedDataset(prefix)


def test_mismatched_pair(tmp_path):
    _write(tmp_path / "a", DOCS, np.uint16)
    _write(tmp_path / "b", DOCS[:2], np.uint16)
    (tmp_path / "b.bin").write_bytes((tmp_path / "a.bin").read_bytes())
    with pytest.raises(DataError, match="do not belong together"):
        IndexedDataset(str(tmp_path / "b"))


def test_truncated_index_and_bad_header(tmp_path):
    prefix = _write(tmp_path / "ds", DOCS, np.uint16)
    idx = (tmp_path / "ds.idx").read_bytes()
    (tmp_path / "ds.idx").write_bytes(idx[:90])
    with pytest.raises(DataError, match=r"ds\.idx: index truncated: 90 bytes.*need 102"):
        IndexedDataset(prefix)
    (tmp_path / "ds.idx").write_bytes(idx[:20])
    with pytest.raises(DataError, match="truncated header"):
        IndexedDataset(prefix)
    (tmp_path / "ds.idx").write_bytes(b"TNTIDX\x00\x00" + idx[8:])
    with pytest.raises(DataError, match="bad magic"):
        IndexedDataset(prefix)
    (tmp_path / "ds.idx").write_bytes(idx[:17] + bytes([9]) + idx[18:])
    with pytest.raises(DataError, match="unknown dtype code 9"):
        IndexedDataset(prefix)
    (tmp_path / "ds.idx").write_bytes(idx[:9] + _le(2, 8) + idx[17:])
    with pytest.raises(DataError, match="version 2"):
        IndexedDataset(prefix)
    bad_ptr = idx[:46] + _le(0, 8) + _le(6, 8) + _le(14, 8) + idx[70:]
    (tmp_path / "ds.idx").write_bytes(bad_ptr)
    with pytest.raises(DataError, match="sizes and pointers disagree"):
        IndexedDataset(prefix)
