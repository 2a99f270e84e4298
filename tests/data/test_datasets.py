"""build_datasets from cfg.data: split strings, path lists with weights and labels, and the error messages."""

from __future__ import annotations

import os

import numpy as np
import pytest

from neox.config.schema import DataConfig
from neox.data.blend import BlendableDataset
from neox.data.datasets import build_datasets, num_samples_for, parse_split
from neox.data.sampling import GPT2Dataset
from neox.errors import ConfigError, DataError
from tests.data.test_sampling import write_dataset


@pytest.mark.parametrize(
    "split, n, expected",
    [
        ("949,50,1", 1000, [0, 949, 999, 1000]),
        ("969,30,1", 100, [0, 97, 100, 100]),  # 0.1 test documents round to none
        ("1/1", 3, [0, 1, 3, 3]),  # 1.5 + 1.5 round to 4: the excess comes off every boundary
        ("1", 7, [0, 7, 7, 7]),
        ("8,2", 10, [0, 8, 10, 10]),
    ],
)
def test_parse_split(split, n, expected):
    assert parse_split(split, n) == expected


@pytest.mark.parametrize("split", ["a,b,c", "1,2,3,4", "0,0,0", "-1,2,1", ""])
def test_parse_split_errors(split):
    with pytest.raises(ConfigError, match="data.split"):
        parse_split(split, 10)


def test_num_samples_for():
    # GPT-NeoX: train_iters * batch, (train_iters // eval_interval + 1) * eval_iters * batch, eval_iters * batch
    assert num_samples_for(100, 8, 40, 5) == (800, 120, 40)


def _docs(seed, n):
    rs = np.random.RandomState(seed)
    return [rs.randint(1, 500, size=rs.randint(5, 40)) for _ in range(n)]


def test_single_path_split(tmp_path):
    write_dataset(tmp_path / "d_text_document", _docs(0, 100))
    cfg = DataConfig(data_path=str(tmp_path / "d_text_document"), split="90,8,2")
    train, valid, test = build_datasets(cfg, 16, 1234, (50, 10, 5))
    assert all(isinstance(d, GPT2Dataset) for d in (train, valid, test))
    assert set(train.doc_idx) == set(range(90)) and set(valid.doc_idx) == set(range(90, 98))
    assert set(test.doc_idx) == {98, 99}
    for name, n in (("train", 50), ("valid", 10), ("test", 5)):
        assert os.path.isfile(
            tmp_path / f"d_text_document_{name}_indexmap_{n}ns_16sl_1234s_packedpi_ac_shuffle_idx.npy"
        )
    # Another split under the same cache names: the stale index is noticed and rebuilt.
    with pytest.warns(UserWarning, match="does not match"):
        _, _, none = build_datasets(DataConfig(data_path=cfg.data_path, split="95,5"), 16, 1234, (50, 10, 5))
    assert none is None


def test_path_lists_weights_and_labels(tmp_path):
    a = write_dataset(tmp_path / "a", _docs(1, 30))
    b = write_dataset(tmp_path / "b", _docs(2, 10))
    la = write_dataset(tmp_path / "la", [np.where(d % 2 == 0, d, -100) for d in _docs(1, 30)])
    lb = write_dataset(tmp_path / "lb", _docs(2, 10))
    cfg = DataConfig(
        train_data_paths=[a.prefix, b.prefix],
        train_data_weights=[3, 1],
        label_data_paths=[la.prefix, lb.prefix],
        valid_data_paths=[b.prefix],
    )
    train, valid, test = build_datasets(cfg, 8, 7, (200, 20, 0))
    assert isinstance(train, BlendableDataset) and test is None
    assert [d.name for d in train.datasets] == ["train_0", "train_1"]
    assert list(train.weights) == [0.75, 0.25]
    # Each part is asked for its share plus 0.5%, which names its cache.
    assert os.path.isfile(str(a.prefix) + "_train_0_indexmap_151ns_8sl_7s_packedpi_ac_doc_idx.npy")
    assert os.path.isfile(str(b.prefix) + "_train_1_indexmap_51ns_8sl_7s_packedpi_ac_doc_idx.npy")
    assert os.path.isfile(str(b.prefix) + "_valid_0_indexmap_21ns_8sl_7s_packedpi_ac_doc_idx.npy")  # ceil(20 * 1.005)
    item = train[0]
    assert set(item) == {"text", "label"} and item["label"].shape == (9,)
    assert "label" not in valid[0]

    by_docs = DataConfig(
        train_data_paths=[a.prefix, b.prefix], weight_by_num_documents=True, weighted_sampler_alpha=1.0
    )
    train2, _, _ = build_datasets(by_docs, 8, 7, (100, 0, 0))
    # alpha 1: p = (.75, .25) times (1 - p) = equal weights.
    assert train2.weights == pytest.approx([0.5, 0.5])


def test_errors_name_key_and_fix(tmp_path):
    write_dataset(tmp_path / "x_text_document", _docs(3, 5))
    with pytest.raises(DataError, match=r"data.data_path: not found: .*x\.idx .*did you mean .*neox preprocess"):
        build_datasets(DataConfig(data_path=str(tmp_path / "x")), 8, 1, (1, 1, 1))
    with pytest.raises(DataError, match=r"data.train_data_paths\[1\]: not found"):
        build_datasets(
            DataConfig(train_data_paths=[str(tmp_path / "x_text_document"), str(tmp_path / "nope")]), 8, 1, (1, 1, 1)
        )
    with pytest.raises(ConfigError, match="both set"):
        build_datasets(DataConfig(data_path="p", train_data_paths=["q"]), 8, 1, (1, 1, 1))
    with pytest.raises(ConfigError, match="no training data"):
        build_datasets(DataConfig(), 8, 1, (1, 1, 1))
    with pytest.raises(ConfigError, match="train_data_weights"):
        build_datasets(
            DataConfig(train_data_paths=[str(tmp_path / "x_text_document")], train_data_weights=[1, 2]), 8, 1, (1, 1, 1)
        )
