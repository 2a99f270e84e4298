"""GPT-NeoX's sample order (``GPT2Dataset``, pack_impl "packed"): which tokens make up training sample i.

Documents are concatenated in a shuffled order and cut into samples of ``seq_length + 1`` tokens that overlap
by one token (the last input token of a sample is the first of the next). Three index arrays describe this,
built exactly as GPT-NeoX's ``megatron/data/gpt2_dataset.py`` and its C++ ``build_sample_idx`` do:

``doc_idx``      int32 [epochs * docs]  the documents of every epoch, shuffled all together
``sample_idx``   int32 [samples + 1, 2] (index into doc_idx, token offset) where sample i starts; i+1 ends it
``shuffle_idx``  uint32 [samples]      the order samples are served in

Both shuffles draw from one ``np.random.RandomState(seed)``, doc_idx first, so the same data, seed,
seq_length and sample count give the same token sequences in the same order as GPT-NeoX (the property
Pythia-style data-order research relies on). The arrays are cached as ``.npy`` files under GPT-NeoX's names.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings

import numpy as np

from neox.errors import DataError

INT32_MAX = np.iinfo(np.int32).max
UINT32_MAX = np.iinfo(np.uint32).max


def num_tokens(documents: np.ndarray, sizes: np.ndarray) -> int:
    """Tokens in one epoch of ``documents``."""
    return int(np.sum(sizes[documents], dtype=np.int64))


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs that yield ``num_samples`` samples.

    A sample needs seq_length + 1 tokens but shares its last token with the next sample, so E epochs give
    (E * tokens - 1) // seq_length samples; GPT-NeoX counts epochs up until that reaches num_samples.
    """
    if tokens_per_epoch < 2:
        raise DataError(f"the dataset has {tokens_per_epoch} tokens; sampling needs at least 2")
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """Every epoch's documents back to back, shuffled together (one ``rng.shuffle`` call)."""
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    # RandomState.shuffle's draws depend only on the length, so this matches GPT-NeoX's mgrid-built array.
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int, tokens_per_epoch: int
) -> np.ndarray:
    """Start (doc_idx index, offset) of every sample, plus the end of the last one.

    GPT-NeoX walks documents in C++; the walk always lands on global token position i * seq_length of the
    doc_idx-ordered stream, in the document that contains it (empty documents are stepped over). So one
    cumulative sum and one ``searchsorted`` give the same table: 100M tokens index in well under a second.
    """
    if seq_length < 1:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    n = (num_epochs * tokens_per_epoch - 1) // seq_length
    doc_sizes = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(doc_sizes)
    positions = np.arange(n + 1, dtype=np.int64) * seq_length
    which = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[which] - doc_sizes[which])
    # Same rule as GPT-NeoX for when int32 no longer suffices.
    wide = 2 * (n + 1) >= INT32_MAX or len(doc_idx) >= INT32_MAX
    out = np.empty((n + 1, 2), dtype=np.int64 if wide else np.int32)
    out[:, 0] = which
    out[:, 1] = offsets
    out[0] = 0  # GPT-NeoX starts at (0, 0) even if the first document is empty.
    return out


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    """``arange(size)`` shuffled: uint32 unless it needs 64 bits (GPT-NeoX's dtype rule)."""
    dtype = np.int64 if size >= UINT32_MAX - 1 else np.uint32
    shuffle_idx = np.arange(size, dtype=dtype)
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def index_file_prefix(
    data_prefix: str, name: str, num_samples: int, seq_length: int, seed: int, cache_dir: str | None = None
) -> str:
    """GPT-NeoX's cache name, ``{prefix}_{name}_indexmap_{N}ns_{L}sl_{seed}s`` (then ``_doc_idx.npy`` ...).

    With ``cache_dir`` the files go there under the data prefix's base name.
    """
    base = str(data_prefix) if cache_dir is None else os.path.join(cache_dir, os.path.basename(str(data_prefix)))
    return f"{base}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"


def index_file_paths(cache_prefix: str) -> dict[str, str]:
    return {k: f"{cache_prefix}_{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")}


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """An inter-process lock, so one rank (per file system) builds the cache while the others wait."""
    try:
        f = open(lock_path, "a")
    except OSError as e:
        raise DataError(
            f"cannot write the index cache {lock_path}: {e.strerror}; set data.data_cache_dir to a writable directory"
        ) from None
    with f:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one process per machine is the supported case there
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)  # numbers only: the cache never unpickles
    os.replace(tmp, path)  # readers never see a half-written file


def build_index_mappings(
    name: str,
    data_prefix: str,
    documents: np.ndarray,
    sizes: np.ndarray,
    num_samples: int,
    seq_length: int,
    seed: int,
    num_epochs: int | None = None,
    cache_dir: str | None = None,
    verbose: bool = False,
):
    """Load the cached (doc_idx, sample_idx, shuffle_idx) or build and cache them; returns memory maps."""
    tokens_per_epoch = num_tokens(documents, sizes)
    if not num_epochs:
        num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    elif tokens_per_epoch < 2:
        raise DataError(f"{data_prefix}: {tokens_per_epoch} tokens; sampling needs at least 2")
    cache_prefix = index_file_prefix(data_prefix, name, num_samples, seq_length, seed, cache_dir)
    paths = index_file_paths(cache_prefix)
    cache_parent = os.path.dirname(os.path.abspath(cache_prefix))
    try:
        os.makedirs(cache_parent, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the index cache directory {cache_parent}: {e.strerror}; "
            f"set data.data_cache_dir to a writable directory"
        ) from None

    expected_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    expected = {
        "doc_idx": (num_epochs * len(documents),),
        "sample_idx": (expected_samples + 1, 2),
        "shuffle_idx": (expected_samples,),
    }

    def load():
        """The cached arrays, or None when missing or built for other data (the name does not say which
        documents: a changed split or dataset leaves a stale cache under the same name, as in GPT-NeoX)."""
        if not all(os.path.isfile(p) for p in paths.values()):
            return None
        try:
            arrays = {k: np.load(p, allow_pickle=False, mmap_mode="r") for k, p in paths.items()}
        except (ValueError, OSError):
            return None
        if any(arrays[k].shape != shape for k, shape in expected.items()):
            return None
        return arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]

    cached = load()
    if cached is not None:
        return cached
    with _exclusive(cache_prefix + ".lock"):
        cached = load()  # another process may have built it while we waited
        if cached is not None:
            return cached
        if any(os.path.isfile(p) for p in paths.values()):
            warnings.warn(
                f"{cache_prefix}_*.npy: cached index does not match this data (changed split or "
                f"dataset?); rebuilding it",
                stacklevel=2,
            )
        t0 = time.perf_counter()
        rng = np.random.RandomState(seed=seed)
        doc_idx = build_doc_idx(documents, num_epochs, rng)
        sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
        # -1: sample i spans sample_idx[i] .. sample_idx[i + 1].
        shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
        for key, arr in (("doc_idx", doc_idx), ("sample_idx", sample_idx), ("shuffle_idx", shuffle_idx)):
            _save(paths[key], arr)
        if verbose:
            print(
                f" > built {name} index for {data_prefix}: {num_epochs} epoch(s), "
                f"{sample_idx.shape[0] - 1} samples in {time.perf_counter() - t0:.2f}s"
            )
        cached = load()
        # Safe to drop while held: a process still waiting on it re-checks and finds the files in place.
        with contextlib.suppress(OSError):
            os.remove(cache_prefix + ".lock")
    if cached is None:
        raise DataError(f"{cache_prefix}_*.npy: index cache unreadable right after writing it; check the disk")
    return cached


class GPT2Dataset:
    """Packed samples of ``seq_length + 1`` tokens in GPT-NeoX order.

    ``ds[i]`` is ``{"text": int64[seq_length + 1]}``, plus ``"label"`` (same shape, -100 = no loss) when a
    label dataset parallel to the text is given, plus ``"segment"`` (document ordinal of each token within
    the sample) when ``return_segments`` is set: document boundaries for attention / position resets that
    do not depend on EOD tokens being present.
    """

    def __init__(
        self,
        name: str,
        data_prefix: str,
        documents: np.ndarray,
        indexed_dataset,
        num_samples: int,
        seq_length: int,
        seed: int,
        num_epochs: int | None = None,
        label_dataset=None,
        cache_dir: str | None = None,
        return_segments: bool = False,
        verbose: bool = False,
    ):
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.label_dataset = label_dataset
        self.seq_length = seq_length
        self.return_segments = return_segments
        documents = np.asarray(documents)
        if documents.size == 0:
            raise DataError(f"{data_prefix}: the {name} split has no documents")
        if documents.min() < 0 or documents.max() >= indexed_dataset.sizes.shape[0]:
            raise DataError(f"{data_prefix}: document ids outside [0, {indexed_dataset.sizes.shape[0]})")
        if label_dataset is not None and not np.array_equal(label_dataset.sizes, indexed_dataset.sizes):
            raise DataError(
                f"{getattr(label_dataset, 'prefix', 'label dataset')}: document sizes differ from "
                f"{data_prefix}; a label dataset must be tokenized alongside its text"
            )
        self.doc_idx, self.sample_idx, self.shuffle_idx = build_index_mappings(
            name,
            data_prefix,
            documents,
            indexed_dataset.sizes,
            num_samples,
            seq_length,
            seed,
            num_epochs=num_epochs,
            cache_dir=cache_dir,
            verbose=verbose,
        )

    def __len__(self) -> int:
        # GPT-NeoX's length is min(len(shuffle_idx) - 1, len(sample_idx) - 1): one less than the samples
        # built. Kept, because blending sizes (and so the blended order) depend on it.
        return min(self.shuffle_idx.shape[0] - 1, self.sample_idx.shape[0] - 1)

    def _wrap(self, idx: int) -> int:
        if idx < self.shuffle_idx.shape[0]:
            return idx
        if len(self) == 0:
            raise IndexError(f"sample {idx}: the {self.name} dataset has no samples")
        # GPT-NeoX serves out-of-range requests (a blend asking a small dataset for too many samples)
        # modulo the length instead of failing.
        return idx % len(self)

    def _pieces(self, dataset, first: int, last: int, off_f: int, off_l: int) -> list[np.ndarray]:
        if first == last:
            return [dataset.get(int(self.doc_idx[first]), offset=off_f, length=off_l - off_f + 1)]
        pieces = [dataset.get(int(self.doc_idx[first]), offset=off_f)]
        pieces.extend(dataset.get(int(self.doc_idx[i])) for i in range(first + 1, last))
        pieces.append(dataset.get(int(self.doc_idx[last]), length=off_l + 1))
        return pieces

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if idx < 0:
            raise IndexError(f"negative sample index {idx}")
        i = int(self.shuffle_idx[self._wrap(idx)])
        first, off_f = (int(v) for v in self.sample_idx[i])
        last, off_l = (int(v) for v in self.sample_idx[i + 1])
        want = self.seq_length + 1
        pieces = self._pieces(self.indexed_dataset, first, last, off_f, off_l)
        text = np.concatenate(pieces).astype(np.int64)
        item = {}
        if self.label_dataset is None:
            item["text"] = _fit(text, want, pad=-100)
        else:
            label = np.concatenate(self._pieces(self.label_dataset, first, last, off_f, off_l)).astype(np.int64)
            item["text"] = _fit(text, want, pad=0)
            item["label"] = _fit(label, want, pad=-100)
        if self.return_segments:
            lengths = [len(p) for p in pieces]
            item["segment"] = _fit(np.repeat(np.arange(len(lengths), dtype=np.int64), lengths), want, pad=len(lengths))
        return item

    def document_ids(self, idx: int) -> np.ndarray:
        """The dataset's document ids that sample ``idx`` draws tokens from, in order."""
        i = int(self.shuffle_idx[self._wrap(int(idx))])
        return np.asarray(self.doc_idx[int(self.sample_idx[i][0]) : int(self.sample_idx[i + 1][0]) + 1])


def _fit(arr: np.ndarray, n: int, pad: int) -> np.ndarray:
    if len(arr) < n:
        return np.concatenate([arr, np.full(n - len(arr), pad, dtype=arr.dtype)])
    if len(arr) > n:
        warnings.warn(f"sample of {len(arr)} tokens truncated to {n}", stacklevel=3)
        return arr[:n]
    return arr
