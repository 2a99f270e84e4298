"""Blending several datasets by weight, in GPT-NeoX's order (``BlendableDataset``), and its weighting helpers.

Sample n of the blend comes from the dataset whose share so far lags its weight the most: the largest
``weight[i] * max(n, 1) - taken[i]`` (first dataset on ties), and is that dataset's next unused sample. This
is GPT-NeoX's ``helpers.cpp build_blending_indices``; the arithmetic is the same IEEE double arithmetic, so
the indices are identical. The rule is sequential, so the index is built lazily, a chunk at a time, as far
as training has read (a resume at sample k builds up to k once).
"""

from __future__ import annotations

import math

import numpy as np

from neox.errors import ConfigError

CHUNK = 1 << 16


def normalized_weights(weights) -> np.ndarray:
    """float64 weights divided by their sum (numpy's sum, as GPT-NeoX does)."""
    w = np.array(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ConfigError(f"blend weights must be a non-empty list of non-negative numbers, got {list(weights)}")
    total = np.sum(w)
    if total <= 0.0:
        raise ConfigError(f"blend weights sum to {total}; at least one weight must be positive")
    return w / total


def blending_indices(weights, start: int, stop: int, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index uint8, sample index int64) for blend positions [start, stop); ``counts`` is updated.

    ``weights`` must already be normalised; ``counts`` holds how many samples each dataset has given so far
    (all zeros when start is 0).
    """
    w = [float(x) for x in weights]
    c = counts
    which: list[int] = []
    taken: list[int] = []
    add_which, add_taken = which.append, taken.append
    if len(w) == 2:  # the common case, without the inner loop
        w0, w1 = w
        for n in range(start, stop):
            x = float(n) if n > 1 else 1.0
            d = 1 if w1 * x - c[1] > w0 * x - c[0] else 0
            add_which(d)
            add_taken(c[d])
            c[d] += 1
    else:
        rest = range(1, len(w))
        for n in range(start, stop):
            x = float(n) if n > 1 else 1.0
            best, best_err = 0, w[0] * x - c[0]
            for d in rest:
                err = w[d] * x - c[d]
                if err > best_err:
                    best, best_err = d, err
            add_which(best)
            add_taken(c[best])
            c[best] += 1
    return np.array(which, dtype=np.uint8), np.array(taken, dtype=np.int64)


def normalized_weights_and_num_samples(weights, num_samples: int) -> tuple[list[float], list[int]]:
    """GPT-NeoX's per-dataset sample counts: each dataset is asked for 0.5% more than its share."""
    total = sum(weights)
    if total <= 0:
        raise ConfigError(f"blend weights sum to {total}; at least one weight must be positive")
    weights = [w / total for w in weights]
    return weights, [math.ceil(num_samples * w * 1.005) for w in weights]


def weights_by_num_docs(num_docs, alpha: float = 0.3) -> list[float]:
    """Weights from document counts, tempered by ``alpha`` (XLM-R's p ∝ |L|^α, arXiv:1911.02116).

    As in GPT-NeoX, the tempered probabilities are then multiplied by (1 - p_unbiased) and renormalised, so
    a dataset with more documents is not also sampled more per document.
    """
    total_docs = sum(num_docs)
    if total_docs <= 0:
        raise ConfigError("weight_by_num_documents: the datasets have no documents")
    unbiased = [n / total_docs for n in num_docs]
    probs = [p**alpha for p in unbiased]
    s = sum(probs)
    probs = [p / s for p in probs]
    weights = [p * (1 - u) for p, u in zip(probs, unbiased)]
    s = sum(weights)
    if s <= 0:  # one dataset holds every document: (1 - p) zeroes it; it is then the whole blend
        return [1.0 if u == 1.0 else 0.0 for u in unbiased]
    return [w / s for w in weights]


class BlendableDataset:
    """Samples of several datasets interleaved by weight; length is the sum of the datasets' lengths."""

    def __init__(self, datasets, weights):
        if len(datasets) != len(weights):
            raise ConfigError(f"{len(datasets)} datasets but {len(weights)} blend weights")
        if not 0 < len(datasets) < 255:
            raise ConfigError(f"blending needs between 1 and 254 datasets, got {len(datasets)}")
        self.datasets = list(datasets)
        self._given_weights = list(weights)
        self.weights = normalized_weights(weights)
        self.size = sum(len(d) for d in self.datasets)
        self._counts = [0] * len(self.datasets)
        self._which: list[np.ndarray] = []
        self._taken: list[np.ndarray] = []

    def __len__(self) -> int:
        return self.size

    def _ensure(self, chunk: int) -> None:
        while len(self._which) <= chunk:
            start = len(self._which) * CHUNK
            which, taken = blending_indices(self.weights, start, min(start + CHUNK, self.size), self._counts)
            self._which.append(which)
            self._taken.append(taken)

    def source(self, idx: int) -> tuple[int, int]:
        """(dataset index, sample index within it) of blend sample ``idx``."""
        idx = int(idx)
        if idx < 0:
            raise IndexError(f"negative sample index {idx}")
        if idx >= self.size:
            if self.size == 0:
                raise IndexError(f"sample {idx}: the blended datasets have no samples")
            idx %= self.size  # GPT-NeoX wraps out-of-range requests
        chunk, pos = divmod(idx, CHUNK)
        self._ensure(chunk)
        return int(self._which[chunk][pos]), int(self._taken[chunk][pos])

    def __getitem__(self, idx: int) -> dict:
        d, s = self.source(idx)
        return self.datasets[d][s]

    # DataLoader workers receive a pickled copy: send the datasets and weights, not the built chunks.
    def __getstate__(self):
        # (the given weights: normalising twice could move the last bit and with it the order)
        return {"datasets": self.datasets, "weights": self._given_weights}

    def __setstate__(self, state):
        self.__init__(state["datasets"], state["weights"])
