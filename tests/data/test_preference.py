"""Preference preprocessing (pairs and unpaired) and the paired datasets: prompt masked, pairs kept together."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import numpy as np
import pytest

from neox.cli import main as cli
from neox.config import from_dict
from neox.data.indexed import IndexedDataset
from neox.data.preference import (
    PreferenceOptions,
    build_preference_datasets,
    preference_batches,
    preprocess_preferences,
)
from neox.errors import DataError

BYTES = NS(tokenizer_type="ByteLevelTokenizer", vocab_file=None, merge_file=None)
EOD = 256


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


PAIRS = [{"prompt": f"Q{i}:", "chosen": f" good {i}", "rejected": f" bad{i}"} for i in range(7)]


def test_pairs_are_written_with_the_prompt_masked(tmp_path):
    src = _write(tmp_path / "pairs.jsonl", PAIRS)
    s = preprocess_preferences(PreferenceOptions([src], str(tmp_path / "p")), BYTES)
    assert s.documents == 7
    chosen, label = IndexedDataset(s.outputs["chosen"]), IndexedDataset(s.outputs["chosen_label"])
    assert chosen[3].tolist() == list(b"Q3: good 3") + [EOD]
    assert label[3].tolist() == [-100] * 3 + list(b" good 3") + [EOD]
    assert IndexedDataset(s.outputs["rejected"])[6].tolist() == list(b"Q6: bad6") + [EOD]


def test_pair_batches_hold_chosen_then_rejected_of_the_same_pairs(tmp_path):
    src = _write(tmp_path / "pairs.jsonl", PAIRS)
    p = str(tmp_path / "p")
    assert cli(["preprocess", "--input", src, "--output-prefix", p, "--preference", "pairs", "--quiet"]) == 0
    cfg = from_dict(
        {
            "pos_train_data_paths": [f"{p}_chosen_document"],
            "neg_train_data_paths": [f"{p}_rejected_document"],
            "pos_train_label_data_paths": [f"{p}_chosen_label_document"],
            "neg_train_label_data_paths": [f"{p}_rejected_label_document"],
        }
    )
    train, valid, test = build_preference_datasets(cfg.data, 16, 5, paired=True)
    assert valid is None and test is None and len(train) == 7
    seen = []
    for b in preference_batches(train, 2, 0, 1, 0, eod_id=EOD, loop=True):
        if len(seen) >= 14:
            break
        for row in range(2):
            i = int(b["pair_index"][row])
            good = bytes(t for t in b["labels"][row].tolist() if 0 <= t < 256).decode()
            bad = bytes(t for t in b["labels"][row + 2].tolist() if 0 <= t < 256).decode()
            assert (good, bad) == (f" good {i}", f" bad{i}")
            seen.append(i)
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))  # an epoch each
    assert seen[:7] != seen[7:14]  # reshuffled


def test_unpaired_rows_write_a_reward_per_document(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": False}]
    s = preprocess_preferences(
        PreferenceOptions([_write(tmp_path / "u.jsonl", rows)], str(tmp_path / "u"), "unpaired"), BYTES
    )
    reward = IndexedDataset(s.outputs["reward"])
    assert [reward[i].tolist() for i in range(2)] == [[1], [-1]]
    assert np.array_equal(
        IndexedDataset(s.outputs["completion"]).sizes, IndexedDataset(s.outputs["completion_label"]).sizes
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "chosen": "b"}', r"bad\.jsonl:2: key 'rejected' is missing"),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}', r"bad\.jsonl:2: key 'chosen' is a int"),
        ('{"prompt": "a", ', r"bad\.jsonl:2: "),
        ('["a"]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"prompt": "a", "chosen": "", "rejected": "c"}', None),  # an empty completion still ends in EOD
    ],
)
def test_malformed_pair_lines_are_one_line_errors(tmp_path, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(PAIRS[0]) + "\n" + line + "\n", encoding="utf-8")
    opts = PreferenceOptions([str(src)], str(tmp_path / "b"))
    if message is None:
        assert preprocess_preferences(opts, BYTES).documents == 2
        return
    with pytest.raises(DataError, match=message) as e:
        preprocess_preferences(opts, BYTES)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("b_*"))


def test_flags_of_plain_corpora_are_refused(tmp_path, capsys):
    src = _write(tmp_path / "pairs.jsonl", PAIRS)
    args = ["preprocess", "--input", src, "--output-prefix", str(tmp_path / "p"), "--preference", "pairs"]
    assert cli([*args, "--workers", "2"]) == 2
    assert "drop --workers" in capsys.readouterr().err
