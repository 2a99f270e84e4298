"""GPT2Dataset order against hand-worked indices and a slow reference written from GPT-NeoX's algorithm."""

from __future__ import annotations

import os

import numpy as np
import pytest

from neox.data import sampling
from neox.data.indexed import IndexedDataset, IndexedDatasetBuilder
from neox.data.sampling import (
    GPT2Dataset,
    build_doc_idx,
    build_sample_idx,
    build_shuffle_idx,
    index_file_prefix,
    num_epochs_needed,
    num_tokens,
)
from neox.errors import DataError


def write_dataset(prefix, docs, dtype=np.int32) -> IndexedDataset:
    """An indexed dataset with one item per document (what preprocess writes)."""
    with IndexedDatasetBuilder(str(prefix), dtype=dtype) as b:
        for d in docs:
            b.add_document(np.asarray(d, dtype=dtype))
        b.finalize()
    return IndexedDataset(str(prefix))


def reference_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """GPT-NeoX's helpers.cpp build_sample_idx walk, one document at a time (slow, obviously right)."""
    n = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = [(0, 0)]
    j, offset = 0, 0
    while len(out) <= n:
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[j]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                j, offset = j + 1, 0
        out.append((j, offset))
    return np.array(out)


def reference_epochs(tokens_per_epoch, seq_length, num_samples):
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            return epochs


@pytest.mark.parametrize(
    "sizes, seq_length, expected",
    [
        ([3, 5, 2], 4, [[0, 0], [1, 1], [2, 0]]),  # samples start at global tokens 0, 4, 8
        ([5, 3], 4, [[0, 0], [0, 4]]),  # a sample ending on a document's last token stays there
        ([2, 0, 3], 2, [[0, 0], [2, 0], [2, 2]]),  # empty documents are stepped over
        ([0, 4], 3, [[0, 0], [1, 3]]),  # ... except the first start, which is always (0, 0)
    ],
)
def test_sample_idx_hand_worked(sizes, seq_length, expected):
    sizes = np.array(sizes, dtype=np.int32)
    doc_idx = np.arange(len(sizes), dtype=np.int32)
    got = build_sample_idx(sizes, doc_idx, seq_length, 1, int(sizes.sum()))
    assert got.tolist() == expected
    assert got.dtype == np.int32


def test_sample_idx_matches_reference_walk():
    rs = np.random.RandomState(0)
    for trial in range(200):
        n_docs = rs.randint(1, 15)
        sizes = rs.randint(0, 10, size=n_docs).astype(np.int32)
        if sizes.sum() < 2:
            continue
        seq_length, num_samples = rs.randint(1, 12), rs.randint(0, 25)
        docs = np.arange(n_docs, dtype=np.int32)
        tokens = num_tokens(docs, sizes)
        epochs = num_epochs_needed(tokens, seq_length, num_samples)
        assert epochs == reference_epochs(tokens, seq_length, num_samples)
        doc_idx = build_doc_idx(docs, epochs, np.random.RandomState(trial))
        np.testing.assert_array_equal(
            build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens),
            reference_sample_idx(sizes, doc_idx, seq_length, epochs, tokens),
        )


def test_doc_idx_is_gpt_neox_mgrid_shuffle():
    documents = np.arange(3, 9, dtype=np.int32)
    # GPT-NeoX: mgrid rows filled with the documents, flattened, int32, one shuffle.
    ref = np.mgrid[0:3, 0 : len(documents)][1]
    ref[:] = documents
    ref = ref.reshape(-1).astype(np.int32)
    np.random.RandomState(7).shuffle(ref)
    got = build_doc_idx(documents, 3, np.random.RandomState(7))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    assert build_shuffle_idx(10, np.random.RandomState(0)).dtype == np.uint32


def test_dataset_order_is_the_documented_stream(tmp_path):
    rs = np.random.RandomState(1)
    docs = [rs.randint(0, 1000, size=rs.randint(1, 30)) for _ in range(40)]
    ds = write_dataset(tmp_path / "corpus_text_document", docs)
    seq, seed, wanted = 16, 1234, 100
    gpt = GPT2Dataset("train", ds.prefix, np.arange(len(docs), dtype=np.int32), ds, wanted, seq, seed)

    # The same thing by its definition: one RandomState, doc order shuffled first, then the sample order;
    # the flattened stream is cut every seq tokens into seq + 1 token windows.
    rng = np.random.RandomState(seed)
    tokens = sum(len(d) for d in docs)
    epochs = reference_epochs(tokens, seq, wanted)
    order = np.tile(np.arange(len(docs), dtype=np.int32), epochs)
    rng.shuffle(order)
    stream = np.concatenate([docs[i] for i in order])
    n = (epochs * tokens - 1) // seq
    perm = np.arange(n, dtype=np.uint32)
    rng.shuffle(perm)

    assert len(gpt) == n - 1 >= wanted
    for i in range(len(gpt)):
        s = int(perm[i]) * seq
        np.testing.assert_array_equal(gpt[i]["text"], stream[s : s + seq + 1])
        assert gpt[i]["text"].dtype == np.int64
    # GPT-NeoX serves an index past the shuffle modulo its length.
    np.testing.assert_array_equal(gpt[n + 3]["text"], gpt[(n + 3) % len(gpt)]["text"])


def test_cache_file_names_dtypes_and_reuse(tmp_path, monkeypatch):
    ds = write_dataset(tmp_path / "c_text_document", [[1, 2, 3, 4, 5]] * 6)
    GPT2Dataset("valid", ds.prefix, np.arange(6, dtype=np.int32), ds, 7, 4, 42)
    # current GPT-NeoX's name: the pack mode and allow_chopped appended
    stem = str(tmp_path / "c_text_document_valid_indexmap_7ns_4sl_42s_packedpi_ac")
    assert index_file_prefix(ds.prefix, "valid", 7, 4, 42) == stem
    arrays = {k: np.load(f"{stem}_{k}.npy") for k in ("doc_idx", "sample_idx", "shuffle_idx")}
    assert arrays["doc_idx"].dtype == np.int32
    assert arrays["sample_idx"].dtype == np.int32 and arrays["sample_idx"].shape[1] == 2
    assert arrays["shuffle_idx"].dtype == np.uint32

    def no_rebuild(*a, **k):
        raise AssertionError("index rebuilt although the cache exists")

    monkeypatch.setattr(sampling, "build_sample_idx", no_rebuild)
    again = GPT2Dataset("valid", ds.prefix, np.arange(6, dtype=np.int32), ds, 7, 4, 42)
    np.testing.assert_array_equal(again.shuffle_idx, arrays["shuffle_idx"])

    cache = tmp_path / "cache"
    monkeypatch.undo()
    GPT2Dataset("valid", ds.prefix, np.arange(6, dtype=np.int32), ds, 7, 4, 42, cache_dir=str(cache))
    assert os.path.isfile(cache / "c_text_document_valid_indexmap_7ns_4sl_42s_packedpi_ac_doc_idx.npy")


def test_labels_segments_and_errors(tmp_path):
    text = write_dataset(tmp_path / "t", [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    label = write_dataset(tmp_path / "l", [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9]])
    gpt = GPT2Dataset(
        "train", text.prefix, np.arange(3, dtype=np.int32), text, 1, 4, 3, label_dataset=label, return_segments=True
    )
    for i in range(len(gpt)):
        item = gpt[i]
        docs = gpt.document_ids(i)
        # Labels come from the same documents and offsets as the text.
        assert (item["label"] == item["text"]).sum() + (item["label"] == -100).sum() == 5
        assert item["segment"][0] == 0 and item["segment"][-1] == len(docs) - 1
        assert np.all(np.diff(item["segment"]) >= 0)
    bad = write_dataset(tmp_path / "bad", [[1, 2], [3]])
    with pytest.raises(DataError, match="sizes differ"):
        GPT2Dataset("train", text.prefix, np.arange(3, dtype=np.int32), text, 1, 4, 3, label_dataset=bad)
    tiny = write_dataset(tmp_path / "tiny", [[1]])
    with pytest.raises(DataError, match="at least 2"):
        GPT2Dataset("train", tiny.prefix, np.arange(1, dtype=np.int32), tiny, 1, 4, 3)


@pytest.mark.parametrize("seq", [2048, 128])
def test_index_of_100m_tokens_tiles_the_document_stream(seq):
    """At 100M tokens (the timing is bench/index.py): every document is in doc_idx once per epoch, sample k
    starts inside a non-empty document at token k * seq of the doc_idx-ordered stream, consecutive samples
    overlap by exactly one token, and less than one sample's worth of the stream is left unused."""
    rs = np.random.RandomState(0)
    sizes = rs.randint(1, 4000, size=50_000).astype(np.int32)  # ~100M tokens
    sizes[rs.choice(len(sizes), 500, replace=False)] = 0  # empty documents are stepped over
    docs = np.arange(len(sizes), dtype=np.int32)
    tokens = num_tokens(docs, sizes)
    assert tokens == int(sizes.sum(dtype=np.int64)) > 90_000_000
    wanted = tokens // seq + 5  # a little more than one epoch gives: two epochs
    epochs = num_epochs_needed(tokens, seq, wanted)
    assert epochs == 2 and (epochs * tokens - 1) // seq >= wanted > (tokens - 1) // seq
    rng = np.random.RandomState(1234)
    doc_idx = build_doc_idx(docs, epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq, epochs, tokens)
    shuffle_idx = build_shuffle_idx(len(sample_idx) - 1, rng)

    # coverage: each document once per epoch
    np.testing.assert_array_equal(np.bincount(doc_idx, minlength=len(docs)), np.full(len(docs), epochs))
    # sample boundaries: (position in doc_idx, offset) of sample k is global token k * seq of the stream
    n = (epochs * tokens - 1) // seq
    assert sample_idx.shape == (n + 1, 2) and sample_idx[0].tolist() == [0, 0]
    which, offset = sample_idx[:, 0].astype(np.int64), sample_idx[:, 1].astype(np.int64)
    lengths = sizes[doc_idx].astype(np.int64)
    doc_start = np.concatenate([[0], np.cumsum(lengths)])  # stream position of each doc_idx entry
    assert np.all(np.diff(which) >= 0) and which[-1] < len(doc_idx)
    assert np.all((offset[1:] >= 0) & (offset[1:] < lengths[which[1:]]))  # inside a non-empty document
    np.testing.assert_array_equal(doc_start[which] + offset, np.arange(n + 1, dtype=np.int64) * seq)
    # each sample reads seq + 1 tokens, the last one included: all inside the stream, under seq left over
    assert n * seq + 1 <= epochs * tokens < (n + 1) * seq + 1
    # the sample order is a permutation of the first n samples
    assert shuffle_idx.dtype == np.uint32
    np.testing.assert_array_equal(np.sort(shuffle_idx), np.arange(n, dtype=np.uint32))


def test_stale_cache_for_other_documents_is_rebuilt(tmp_path):
    ds = write_dataset(tmp_path / "s", [[1, 2, 3, 4]] * 10)
    GPT2Dataset("train", ds.prefix, np.arange(8, dtype=np.int32), ds, 5, 3, 1)
    # Same cache name, different documents (a changed split): GPT-NeoX would silently reuse the old index.
    with pytest.warns(UserWarning, match="does not match"):
        again = GPT2Dataset("train", ds.prefix, np.arange(6, dtype=np.int32), ds, 5, 3, 1)
    assert len(again.doc_idx) % 6 == 0 and set(again.doc_idx) == set(range(6))


def test_concurrent_builders_agree(tmp_path):
    """Processes racing to build the same cache (ranks on one file system) all load one identical index."""
    import multiprocessing as mp

    ds = write_dataset(tmp_path / "r", [list(range(1, 50))] * 40)
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        orders = pool.starmap(_shuffle_of, [(ds.prefix,)] * 3)
    assert orders[0] == orders[1] == orders[2]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["r.bin", "r.idx", "r.checksums.json"]
        + [f"r_train_indexmap_300ns_8sl_5s_packedpi_ac_{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")]
    )


def _shuffle_of(prefix):
    ds = IndexedDataset(prefix)
    return GPT2Dataset("train", prefix, np.arange(len(ds), dtype=np.int32), ds, 300, 8, 5).shuffle_idx.tolist()
