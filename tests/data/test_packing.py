"""pack_impl pack_until_overflow and unpacked: the served token sequences against a reference that works on
lists of documents (written from GPT-NeoX's gpt2_dataset.py description), hand-worked examples, and the index
cache under GPT-NeoX's current and older names."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neox.config import from_dict
from neox.config.schema import DataConfig
from neox.data import sampling
from neox.data.datasets import build_datasets
from neox.data.sampling import GPT2Dataset, index_file_paths, index_file_prefix, legacy_index_file_prefix
from neox.errors import ConfigError, DataError
from tests.data.test_sampling import write_dataset


def fit(tokens: list[int], n: int, pad: int = -100) -> list[int]:
    return (tokens + [pad] * n)[:n]


def reference_groups(docs, documents, num_samples, seq, seed, mode, allow_chopped, masked=frozenset()):
    """(the documents of every built sample, the sample order) as GPT-NeoX describes the two modes."""
    rng = np.random.RandomState(seed)
    order = list(range(num_samples))
    rng.shuffle(order)  # the sample order is drawn first

    def usable(d):
        return (allow_chopped or len(docs[d]) <= seq + 1) and d not in masked

    groups: list[list[int]] = []
    if mode == "unpacked":
        chosen = []
        pos = 0
        while len(chosen) <= num_samples:  # one more: the last sample's overlap token
            if usable(documents[pos]):
                chosen.append(documents[pos])
            pos = (pos + 1) % len(documents)
        return [[d] for d in chosen], order
    perm = list(range(len(documents)))
    rng.shuffle(perm)
    pos, length = 0, 0
    while len(groups) < num_samples:
        d = documents[perm[pos]]
        if usable(d):
            if not groups or length == 0 or length + len(docs[d]) > seq + 1:
                groups.append([d])
                length = len(docs[d])
            else:
                groups[-1].append(d)
                length += len(docs[d])
        pos += 1
        if pos == len(documents):
            pos = 0
            rng.shuffle(perm)
    return groups, order


def reference_served(docs, documents, num_samples, seq, seed, mode, allow_chopped=True, masked=frozenset()):
    """Every index GPT-NeoX serves (0 .. num_samples - 2): a sample's documents whole, the first token of the
    next sample's first document, padded with -100 or cut to seq + 1."""
    groups, order = reference_groups(docs, documents, num_samples, seq, seed, mode, allow_chopped, masked)
    length = num_samples - 1
    out = []
    for i in range(length):
        k = order[i]
        if k + 1 >= len(groups):  # the last packed sample has no next one: GPT-NeoX serves order[k % len]
            k = order[k % length]
        tokens = [t for d in groups[k] for t in docs[d]]
        if k + 1 < len(groups):  # (where that is the last one again, GPT-NeoX recurses forever; no overlap here)
            tokens += docs[groups[k + 1][0]][:1]
        out.append(fit(tokens, seq + 1))
    return out


def served(gpt: GPT2Dataset) -> list[list[int]]:
    return [gpt[i]["text"].tolist() for i in range(len(gpt))]


@pytest.mark.parametrize("mode", ["pack_until_overflow", "unpacked"])
@pytest.mark.parametrize("allow_chopped", [True, False])
def test_order_matches_the_reference(tmp_path, mode, allow_chopped):
    rs = np.random.RandomState(3)
    docs = [list(rs.randint(1, 900, size=rs.randint(1, 14))) for _ in range(23)]
    ds = write_dataset(tmp_path / "d", docs)
    for documents, n in ((list(range(23)), 40), (list(range(5, 17)), 31)):  # a split not starting at 0 too
        gpt = GPT2Dataset(
            "train", ds.prefix, np.asarray(documents), ds, n, 6, 11, pack_impl=mode, allow_chopped=allow_chopped
        )
        assert len(gpt) == n - 1
        assert served(gpt) == reference_served(docs, documents, n, 6, 11, mode, allow_chopped)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    n=st.integers(2, 30),
    seq=st.integers(1, 8),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(["pack_until_overflow", "unpacked"]),
)
def test_order_matches_the_reference_on_random_lengths(tmp_path_factory, sizes, n, seq, seed, mode):
    sizes[0] = max(sizes[0], 1)  # at least one token to serve
    docs, t = [], 1
    for s in sizes:
        docs.append(list(range(t, t + s)))
        t += s
    ds = write_dataset(tmp_path_factory.mktemp("h") / "d", docs)
    gpt = GPT2Dataset("train", ds.prefix, np.arange(len(docs)), ds, n, seq, seed, pack_impl=mode)
    assert served(gpt) == reference_served(docs, list(range(len(docs))), n, seq, seed, mode)


def test_unpacked_by_hand(tmp_path):
    docs = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    ds = write_dataset(tmp_path / "u", docs)
    order = list(range(6))
    np.random.RandomState(5).shuffle(order)  # the only draw unpacked makes
    # six samples built (doc_idx has seven documents: the last gives sample 5 its overlap token), five served
    built = [[1, 2, 3, 4, -100], [4, 5, 6, 7, 8], [10, 11, 1, -100, -100]] * 2
    gpt = GPT2Dataset("train", ds.prefix, np.arange(3), ds, 6, 4, 5, pack_impl="unpacked")
    assert gpt.doc_idx.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert served(gpt) == [built[k] for k in order[:5]]
    # without allow_chopped the 6-token document (> seq_length + 1) is left out
    built = [[1, 2, 3, 10, -100], [10, 11, 1, -100, -100]] * 3
    gpt = GPT2Dataset("train", ds.prefix, np.arange(3), ds, 6, 4, 5, pack_impl="unpacked", allow_chopped=False)
    assert served(gpt) == [built[k] for k in order[:5]]


def test_pack_until_overflow_by_hand(tmp_path):
    # two-token documents and seq_length 4: two fit in 5 tokens, a third overflows, so samples are pairs
    docs = [[10 * d + 1, 10 * d + 2] for d in range(4)]
    ds = write_dataset(tmp_path / "p", docs)
    rng = np.random.RandomState(8)
    order = list(range(3))
    rng.shuffle(order)  # first draw: the sample order
    perm = list(range(4))
    rng.shuffle(perm)  # second: the first pass over the documents
    a, b, c, d = perm
    rng.shuffle(perm)  # third: the second pass, whose first document starts the third (last) sample
    e = perm[0]
    gpt = GPT2Dataset("train", ds.prefix, np.arange(4), ds, 3, 4, 8, pack_impl="pack_until_overflow")
    assert gpt.doc_idx.tolist() == [a, b, c, d, e]
    assert gpt.sample_idx.tolist() == [[0, 0], [2, 0], [4, 0], [5, 0]]
    built = [docs[a] + docs[b] + docs[c][:1], docs[c] + docs[d] + docs[e][:1], docs[e] + [-100] * 3]
    want = []
    for k in order[:2]:
        if k == 2:  # the last sample: GPT-NeoX serves order[2 % 2] instead
            k = order[0]
        want.append(built[k])
    assert served(gpt) == want


def test_labels_that_are_all_masked_leave_their_document_out(tmp_path):
    docs = [[1, 2, 3], [4, 5], [6, 7, 8]]
    text = write_dataset(tmp_path / "t", docs)
    label = write_dataset(tmp_path / "l", [[-100, 2, 3], [-100, -100], [-100, 7, 8]])
    for mode in ("pack_until_overflow", "unpacked"):
        gpt = GPT2Dataset("train", text.prefix, np.arange(3), text, 7, 4, 2, label_dataset=label, pack_impl=mode)
        assert 1 not in set(gpt.doc_idx.tolist())
        want = reference_served(docs, [0, 1, 2], 7, 4, 2, mode, masked={1})
        assert served(gpt) == [[0 if t == -100 else t for t in w] for w in want]  # text pads with 0 beside labels


def test_no_usable_document_is_an_error_not_a_hang(tmp_path):
    ds = write_dataset(tmp_path / "long", [list(range(1, 20))] * 3)
    for mode in ("pack_until_overflow", "unpacked"):
        with pytest.raises(DataError, match=r"no document can make a sample: all of them are longer than seq_length"):
            GPT2Dataset("train", ds.prefix, np.arange(3), ds, 4, 4, 1, pack_impl=mode, allow_chopped=False)


def test_cache_names_are_gpt_neox_ones_and_shared(tmp_path, monkeypatch):
    ds = write_dataset(tmp_path / "c_text_document", [[1, 2, 3]] * 8)
    stem = str(tmp_path / "c_text_document_train_indexmap_9ns_4sl_3s")
    assert index_file_prefix(ds.prefix, "train", 9, 4, 3, pack_impl="unpacked") == stem + "_unpackedpi_ac"
    assert index_file_prefix(ds.prefix, "train", 9, 4, 3, allow_chopped=False) == stem + "_packedpi"
    first = GPT2Dataset(
        "train", ds.prefix, np.arange(8), ds, 9, 4, 3, pack_impl="pack_until_overflow", allow_chopped=False
    )
    paths = index_file_paths(stem + "_pack_until_overflowpi")
    assert all(os.path.isfile(p) for p in paths.values())
    assert np.load(paths["sample_idx"]).dtype == np.int64  # what GPT-NeoX's np.save of its int64 lists gives

    def no_rebuild(*a, **k):
        raise AssertionError("index rebuilt although the cache exists")

    monkeypatch.setattr(sampling, "build_pack_until_overflow", no_rebuild)
    again = GPT2Dataset(
        "train", ds.prefix, np.arange(8), ds, 9, 4, 3, pack_impl="pack_until_overflow", allow_chopped=False
    )
    assert served(again) == served(first)


def test_packed_cache_under_the_older_name_is_still_read(tmp_path, monkeypatch):
    ds = write_dataset(tmp_path / "o", [[1, 2, 3, 4, 5]] * 6)
    built = GPT2Dataset("train", ds.prefix, np.arange(6), ds, 7, 4, 42)
    new = index_file_paths(index_file_prefix(ds.prefix, "train", 7, 4, 42))
    old = index_file_paths(legacy_index_file_prefix(ds.prefix, "train", 7, 4, 42))
    for k in new:
        os.replace(new[k], old[k])  # an existing user's cache, written before the names changed
    monkeypatch.setattr(sampling, "build_sample_idx", lambda *a, **k: pytest.fail("rebuilt"))
    again = GPT2Dataset("train", ds.prefix, np.arange(6), ds, 7, 4, 42)
    assert served(again) == served(built)
    assert not any(os.path.isfile(p) for p in new.values())


def test_config_and_build_datasets_pass_the_mode(tmp_path):
    assert from_dict({"pack_impl": "unpacked", "allow_chopped": False}).data.pack_impl == "unpacked"
    with pytest.raises(ConfigError, match=r"key 'pack_impl': 'sorted' is not one of 'packed', 'pack_until_overflow'"):
        from_dict({"pack_impl": "sorted"})
    write_dataset(tmp_path / "d_text_document", [[1, 2, 3, 4]] * 30)
    cfg = DataConfig(
        data_path=str(tmp_path / "d_text_document"), split="8,2", pack_impl="unpacked", allow_chopped=False
    )
    train, valid, _ = build_datasets(cfg, 4, 1, (10, 5, 0))
    assert train.pack_impl == valid.pack_impl == "unpacked"
    assert os.path.isfile(tmp_path / "d_text_document_valid_indexmap_5ns_4sl_1s_unpackedpi_doc_idx.npy")
    assert set(valid.doc_idx.tolist()) <= set(range(24, 30))  # the valid split's own documents
