"""Micro-batches: data-parallel slicing invariance, resume position, masks, position and segment resets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neox.data.loader import batches, collate, micro_batch_indices
from neox.data.sampling import GPT2Dataset
from tests.data.test_sampling import write_dataset

EOD = 0


class Rows:
    """A dataset of fixed rows (sample i is row i)."""

    def __init__(self, rows, **extra):
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.extra = extra

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"text": self.rows[i], **{k: np.asarray(v[i]) for k, v in self.extra.items()}}


def _rows(n=40, t=9):
    return Rows(np.arange(n * t).reshape(n, t) % 50 + 1)


def _cat(batch_lists):
    return {k: torch.cat([b[k] for b in batch_lists]) for k in batch_lists[0]}


def test_dp_slices_concatenate_to_the_dp1_batch():
    ds = _rows()
    whole = list(batches(ds, micro_batch=4))
    for dp in (2, 4):
        per_rank = [list(batches(ds, micro_batch=4 // dp, dp_rank=r, dp_size=dp)) for r in range(dp)]
        assert all(len(p) == len(whole) == 10 for p in per_rank)
        for step, ref in enumerate(whole):
            got = _cat([per_rank[r][step] for r in range(dp)])
            for key in ref:
                assert torch.equal(got[key], ref[key]), (dp, step, key)


def test_resume_at_step_k_starts_at_k_times_global_batch():
    ds = _rows()
    micro, accum, dp = 2, 3, 2
    global_batch = micro * accum * dp
    full = [list(batches(ds, micro, r, dp)) for r in range(dp)]
    k = 1
    resumed = [list(batches(ds, micro, r, dp, start_sample=k * global_batch)) for r in range(dp)]
    for r in range(dp):
        assert len(resumed[r]) == len(full[r]) - k * accum
        for a, b in zip(resumed[r], full[r][k * accum :]):
            assert torch.equal(a["tokens"], b["tokens"])
    # Looping never stops; the indices run on and the dataset wraps them (GPT2Dataset, BlendableDataset).
    idx = micro_batch_indices(10, 4, 0, 1, start_sample=8, loop=True)
    assert [next(idx).tolist() for _ in range(2)] == [[8, 9, 10, 11], [12, 13, 14, 15]]


def test_looping_serves_every_built_sample_then_wraps_like_gpt_neox(tmp_path):
    # 41 distinct tokens, 4-token samples: one epoch gives (41 - 1) // 4 = 10 samples; len is 9 (GPT-NeoX).
    docs = [list(range(1, 9)), list(range(9, 20)), list(range(20, 26)), list(range(26, 38)), list(range(38, 42))]
    ds = write_dataset(tmp_path / "d", docs)
    gpt = GPT2Dataset("train", ds.prefix, np.arange(5, dtype=np.int32), ds, 10, 4, 3)
    assert len(gpt) == 9
    rows = [
        b["tokens"][0].tolist() + b["labels"][0].tolist()[-1:] for _, b in zip(range(12), batches(gpt, 1, loop=True))
    ]
    # The first 10 reads are the 10 built samples, each once; overlapping by one token they cover all 41 tokens.
    assert len({tuple(r) for r in rows[:10]}) == 10
    assert len({t for r in rows[:10] for t in r}) == 41
    # Past the built samples an index is taken modulo the length: 10 -> 1, 11 -> 2.
    assert rows[10] == rows[1] and rows[11] == rows[2]


def test_shift_labels_and_masks():
    text = [[5, 6, EOD, 7, 8, -100, -100]]
    b = collate([{"text": np.array(text[0])}], eod_id=EOD, eod_mask_loss=True)
    assert b["tokens"].tolist() == [[5, 6, EOD, 7, 8, 0]]
    assert b["labels"].tolist() == [[6, EOD, 7, 8, -100, -100]]
    # GPT-NeoX masks positions whose *input* is EOD, and every position without a target.
    assert b["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0]]
    assert b["loss_mask"].dtype == torch.float32
    # positions 0..T-1 are the model's default: nothing to copy to the device unless they restart at EODs
    assert "position_ids" not in b and "segment_ids" not in b

    labelled = collate([{"text": np.array([1, 2, 3, 4]), "label": np.array([-100, -100, 3, 4])}])
    assert labelled["labels"].tolist() == [[-100, 3, 4]] and labelled["loss_mask"].tolist() == [[0, 1, 1]]


def test_position_and_segment_reset_at_eod():
    text = np.array([[3, EOD, 4, 5, EOD, EOD, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    b = collate([{"text": r} for r in text], eod_id=EOD, reset_position_ids=True, reset_attention_mask=True)
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], list(range(8))]
    assert b["segment_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [0] * 8]


def test_segments_from_dataset_boundaries(tmp_path):
    # Documents without EOD tokens: the dataset's own boundaries drive the resets.
    ds = write_dataset(tmp_path / "d", [[11, 12, 13], [21, 22], [31, 32, 33, 34]])
    gpt = GPT2Dataset("train", ds.prefix, np.arange(3, dtype=np.int32), ds, 2, 5, 9, return_segments=True)
    batch = next(batches(gpt, 1, reset_position_ids=True, reset_attention_mask=True))
    tokens = batch["tokens"][0].tolist()
    # Within a document tokens count up by one; anything else is a boundary (also a document repeated).
    changes = [i for i in range(1, len(tokens)) if tokens[i] != tokens[i - 1] + 1]
    assert changes
    assert [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0 and i] == changes
    assert batch["segment_ids"][0].tolist() == [sum(1 for c in changes if c <= i) for i in range(len(tokens))]
    with pytest.raises(ValueError, match="eod_id"):
        next(batches(_rows(), 1, reset_position_ids=True))


def test_worker_processes_give_the_same_batches():
    ds = _rows(12)
    inline = list(batches(ds, 2, 1, 2))
    workers = list(batches(ds, 2, 1, 2, num_workers=1))
    assert len(inline) == len(workers) == 3
    for a, b in zip(inline, workers):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_pin_memory_pins_every_tensor(monkeypatch):
    """Page-locked batches for a GPU run (pinning itself needs CUDA: recorded here instead)."""
    pinned = []

    def pin(t):
        pinned.append(t.shape)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    ds = _rows(4)
    plain = list(batches(ds, 2))
    pinned_batches = list(batches(ds, 2, pin_memory=True))
    assert len(pinned) == sum(len(b) for b in pinned_batches) == 2 * len(plain[0])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(plain, pinned_batches) for k in a)
