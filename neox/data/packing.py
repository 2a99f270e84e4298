"""GPT-NeoX's two other ways of turning documents into samples (`pack_impl`), as its gpt2_dataset.py builds them.

Both produce the same three arrays as the packed order (see sampling.py), with every sample starting at a
document's first token (offset 0), so sample i is its documents whole plus the first token of sample i + 1's
first document (the one-token overlap every GPT-NeoX sample has), padded with -100 or cut to seq_length + 1:

``pack_until_overflow``  documents in a shuffled order are packed into a sample until the next one would make
                         it longer than seq_length + 1 tokens; that one starts the next sample. The order is
                         reshuffled after every pass over the documents.
``unpacked``             one document per sample, in document order, cycling; no shuffle of documents.

The random draws are GPT-NeoX's, from one ``np.random.RandomState(seed)``: first the sample order
(``arange(num_samples)`` shuffled), then for pack_until_overflow the document order of each pass. Without
``allow_chopped`` documents longer than seq_length + 1 are left out (with it they are cut). With a label
dataset, documents whose labels are all -100 are left out (pack_until_overflow looks at the first
seq_length + 1 labels, unpacked at the first seq_length, as GPT-NeoX does).

One deliberate difference: GPT-NeoX takes the shuffled *positions* 0..len(documents)-1 as document ids, which
is right for a split starting at document 0 (the train split, a whole train_data_paths dataset) and reads
the wrong documents for the valid/test splits of one data_path; here positions map through ``documents``,
which gives the same order where GPT-NeoX is right.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from neox.errors import DataError

PACK_IMPLS = ("packed", "pack_until_overflow", "unpacked")


def _skipper(
    sizes: np.ndarray, seq_length: int, allow_chopped: bool, all_masked: Callable[[int], bool] | None
) -> Callable[[int], bool]:
    def skip(doc: int) -> bool:
        if not allow_chopped and int(sizes[doc]) > seq_length + 1:
            return True
        return all_masked is not None and all_masked(doc)

    return skip


def _sample_order(num_samples: int, rng: np.random.RandomState) -> np.ndarray:
    shuffle_idx = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def _nothing_left(what: str, allow_chopped: bool) -> DataError:
    why = "all of them are longer than seq_length + 1 (allow_chopped is false)" if not allow_chopped else ""
    why = why or "their labels are all -100"
    return DataError(f"{what}: no document can make a sample: {why}")


def build_pack_until_overflow(
    documents: np.ndarray,
    sizes: np.ndarray,
    num_samples: int,
    seq_length: int,
    rng: np.random.RandomState,
    allow_chopped: bool = True,
    all_masked: Callable[[int], bool] | None = None,
    what: str = "dataset",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) of pack_until_overflow; `all_masked(doc)` says whether a document's
    first seq_length + 1 labels are all -100 (None without a label dataset)."""
    shuffle_idx = _sample_order(num_samples, rng)
    skip = _skipper(sizes, seq_length, allow_chopped, all_masked)
    order = np.arange(len(documents), dtype=np.int64)
    rng.shuffle(order)
    starts: list[int] = []
    doc_idx: list[int] = []
    running, pos, taken_this_pass = 0, 0, 0
    while len(starts) < num_samples:
        doc = int(documents[order[pos]])
        if not skip(doc):
            length = int(sizes[doc])
            # a sample starts at the first document and wherever the next one would overflow it; an empty
            # document leaves running at 0, so the next one starts a sample too (GPT-NeoX's walk)
            if running == 0 or running + length > seq_length + 1:
                starts.append(len(doc_idx))
                running = length
            else:
                running += length
            doc_idx.append(doc)
            taken_this_pass += 1
        pos += 1
        if pos == len(documents):
            if taken_this_pass == 0:
                raise _nothing_left(what, allow_chopped)
            pos, taken_this_pass = 0, 0
            rng.shuffle(order)
    starts.append(len(doc_idx))
    sample_idx = np.zeros((len(starts), 2), dtype=np.int64)
    sample_idx[:, 0] = starts
    return np.asarray(doc_idx, dtype=np.int64), sample_idx, shuffle_idx


def build_unpacked(
    documents: np.ndarray,
    sizes: np.ndarray,
    num_samples: int,
    seq_length: int,
    rng: np.random.RandomState,
    allow_chopped: bool = True,
    all_masked: Callable[[int], bool] | None = None,
    what: str = "dataset",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) of unpacked: doc_idx holds num_samples + 1 documents (the last one
    gives the final sample its overlap token); `all_masked(doc)` looks at the first seq_length labels."""
    shuffle_idx = _sample_order(num_samples, rng)
    skip = _skipper(sizes, seq_length, allow_chopped, all_masked)
    doc_idx: list[int] = []
    pos, skipped_in_a_row = 0, 0
    while len(doc_idx) <= num_samples:
        doc = int(documents[pos])
        if skip(doc):
            skipped_in_a_row += 1
            if skipped_in_a_row >= len(documents):
                raise _nothing_left(what, allow_chopped)
        else:
            doc_idx.append(doc)
            skipped_in_a_row = 0
        pos = (pos + 1) % len(documents)
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    sample_idx[:, 0] = np.arange(num_samples + 1)
    return np.asarray(doc_idx, dtype=np.int64), sample_idx, shuffle_idx
