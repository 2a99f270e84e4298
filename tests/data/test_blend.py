"""Blending by GPT-NeoX's largest-error rule, and the weighting helpers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from neox.data import blend
from neox.data.blend import (
    BlendableDataset,
    blending_indices,
    normalized_weights,
    normalized_weights_and_num_samples,
    weights_by_num_docs,
)
from neox.errors import ConfigError


def reference_blend(weights, size):
    """helpers.cpp build_blending_indices, written out with numpy (argmax keeps the first of equal errors)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    which, taken = [], []
    for n in range(size):
        d = int(np.argmax(weights * max(float(n), 1.0) - counts.astype(np.float64)))
        which.append(d)
        taken.append(int(counts[d]))
        counts[d] += 1
    return np.array(which), np.array(taken)


class Tagged:
    """A stand-in dataset whose items say where they came from."""

    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tag": self.tag, "i": i}


def test_hand_worked_sequences():
    which, taken = blending_indices(normalized_weights([1, 1]), 0, 6, [0, 0])
    assert which.tolist() == [0, 1, 0, 1, 0, 1] and taken.tolist() == [0, 0, 1, 1, 2, 2]
    # 0.75 / 0.25: errors (.75,.25) (-.25,.25) (.5,-.5) (.25,-.25) (0,0)->first (-.25,.25) (.5,-.5)
    which, taken = blending_indices(normalized_weights([3, 1]), 0, 7, [0, 0])
    assert which.tolist() == [0, 1, 0, 0, 0, 1, 0]
    assert taken.tolist() == [0, 0, 1, 2, 3, 1, 4]
    assert which.dtype == np.uint8 and taken.dtype == np.int64


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [1, 2, 3, 4, 5], [0.6, 0.4], [1.0]])
def test_matches_reference_and_resumes_in_chunks(weights):
    w = normalized_weights(weights)
    ref_which, ref_taken = reference_blend(w, 3000)
    counts = [0] * len(w)
    parts = [blending_indices(w, a, b, counts) for a, b in ((0, 1), (1, 1000), (1000, 3000))]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), ref_which)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), ref_taken)


def test_blendable_dataset_routes_lazily_and_pickles(monkeypatch):
    monkeypatch.setattr(blend, "CHUNK", 7)  # many chunk boundaries
    parts = [Tagged("a", 30), Tagged("b", 10), Tagged("c", 20)]
    ds = BlendableDataset(parts, [2, 1, 1])
    assert len(ds) == 60
    which, taken = reference_blend(normalized_weights([2, 1, 1]), 60)
    late = ds[45]  # builds chunks 0..6 first
    assert late == {"tag": "abc"[which[45]], "i": int(taken[45])}
    assert [ds[i] for i in range(60)] == [{"tag": "abc"[d], "i": int(t)} for d, t in zip(which, taken)]
    assert ds[60 + 5] == ds[5]  # out of range wraps, as in GPT-NeoX
    copy = pickle.loads(pickle.dumps(ds))
    assert [copy[i] for i in range(60)] == [ds[i] for i in range(60)]


def test_weight_helpers_numbers():
    assert weights_by_num_docs([1, 3], alpha=1.0) == pytest.approx([0.5, 0.5])
    # alpha 0.5: p ∝ sqrt(.25), sqrt(.75) = .3660254, .6339746; times (1 - unbiased) .75, .25; renormalised.
    assert weights_by_num_docs([1, 3], alpha=0.5) == pytest.approx([0.6339746, 0.3660254], abs=1e-7)
    assert weights_by_num_docs([5, 5, 10], alpha=0.3) == pytest.approx(
        np.array([0.25**0.3 * 0.75, 0.25**0.3 * 0.75, 0.5**0.3 * 0.5]) / (2 * 0.25**0.3 * 0.75 + 0.5**0.3 * 0.5)
    )
    assert weights_by_num_docs([7]) == [1.0]
    assert normalized_weights_and_num_samples([1, 3], 1000) == ([0.25, 0.75], [252, 754])
    with pytest.raises(ConfigError):
        normalized_weights([0, 0])
    with pytest.raises(ConfigError):
        BlendableDataset([Tagged("a", 3)], [1, 2])
