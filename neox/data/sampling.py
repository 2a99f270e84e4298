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
GPT-NeoX's other pack_impl modes (pack_until_overflow, unpacked) are built in packing.py and served the same way.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings

import numpy as np

from neox.data.packing import PACK_IMPLS, build_pack_until_overflow, build_unpacked
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
    data_prefix: str,
    name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: str | None = None,
    pack_impl: str = "packed",
    allow_chopped: bool = True,
) -> str:
    """Current GPT-NeoX's cache name, ``{prefix}_{name}_indexmap_{N}ns_{L}sl_{seed}s_{pack_impl}pi`` plus
    ``_ac`` with allow_chopped (then ``_doc_idx.npy`` ...), so that either tool reuses the other's cache.

    With ``cache_dir`` the files go there under the data prefix's base name.
    """
    chopped = "_ac" if allow_chopped else ""
    return f"{legacy_index_file_prefix(data_prefix, name, num_samples, seq_length, seed, cache_dir)}_{pack_impl}pi{chopped}"


def legacy_index_file_prefix(
    data_prefix: str, name: str, num_samples: int, seq_length: int, seed: int, cache_dir: str | None = None
) -> str:
    """The name older GPT-NeoX and neox gave the packed order's cache, still read when present."""
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


def _expected(pack_impl: str, documents: np.ndarray, num_samples: int, samples_built: int, num_epochs: int):
    """A check that cached arrays fit this data: their shapes (and for the document-walking modes, that
    their documents are this split's), since the name does not say which documents were used."""
    low, high = int(np.min(documents)), int(np.max(documents))

    def fits(a: dict) -> bool:
        d, si, sh = a["doc_idx"], a["sample_idx"], a["shuffle_idx"]
        if pack_impl == "packed":
            return (
                d.shape == (num_epochs * len(documents),)
                and si.shape == (samples_built + 1, 2)
                and sh.shape == (samples_built,)
            )
        if si.shape != (num_samples + 1, 2) or sh.shape != (num_samples,) or d.ndim != 1 or len(d) == 0:
            return False
        if pack_impl == "unpacked" and len(d) != num_samples + 1:
            return False
        if pack_impl == "pack_until_overflow" and int(si[-1, 0]) != len(d):
            return False
        return low <= int(np.min(d)) and int(np.max(d)) <= high

    return fits


def _load_cached(paths: dict[str, str], fits) -> tuple | None:
    """The cached arrays, or None when missing or built for other data (a changed split or dataset leaves a
    stale cache under the same name, as in GPT-NeoX)."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        arrays = {k: np.load(p, allow_pickle=False, mmap_mode="r") for k, p in paths.items()}
    except (ValueError, OSError):
        return None
    if not fits(arrays):
        return None
    return arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]


def _label_check(label_dataset, n: int):
    if label_dataset is None:
        return None
    return lambda doc: bool(np.all(np.asarray(label_dataset.get(doc))[:n] == -100))


def _build_arrays(
    pack_impl, documents, sizes, num_samples, seq_length, seed, num_epochs, allow_chopped, label_dataset, what
):
    rng = np.random.RandomState(seed=seed)
    if pack_impl == "pack_until_overflow":
        masked = _label_check(label_dataset, seq_length + 1)
        return build_pack_until_overflow(documents, sizes, num_samples, seq_length, rng, allow_chopped, masked, what)
    if pack_impl == "unpacked":
        masked = _label_check(label_dataset, seq_length)
        return build_unpacked(documents, sizes, num_samples, seq_length, rng, allow_chopped, masked, what)
    doc_idx = build_doc_idx(documents, num_epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, num_tokens(documents, sizes))
    # -1: sample i spans sample_idx[i] .. sample_idx[i + 1].
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    return doc_idx, sample_idx, shuffle_idx


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
    pack_impl: str = "packed",
    allow_chopped: bool = True,
    label_dataset=None,
):
    """Load the cached (doc_idx, sample_idx, shuffle_idx) or build and cache them; returns memory maps.

    The packed order also reads a cache under the older name (`legacy_index_file_prefix`) when there is one.
    `label_dataset` lets the document-walking modes leave out documents whose labels are all -100.
    """
    if pack_impl not in PACK_IMPLS:
        raise DataError(f"{data_prefix}: pack_impl {pack_impl!r} is not one of {', '.join(PACK_IMPLS)}")
    tokens_per_epoch = num_tokens(documents, sizes)
    if pack_impl == "packed" and not num_epochs:
        num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    elif tokens_per_epoch < (2 if pack_impl == "packed" else 1):
        raise DataError(f"{data_prefix}: {tokens_per_epoch} tokens; sampling needs at least 2")
    if pack_impl != "packed" and num_samples < 1:
        raise DataError(f"{data_prefix}: the {name} split needs at least one sample for pack_impl {pack_impl}")
    cache_prefix = index_file_prefix(
        data_prefix, name, num_samples, seq_length, seed, cache_dir, pack_impl, allow_chopped
    )
    paths = index_file_paths(cache_prefix)
    cache_parent = os.path.dirname(os.path.abspath(cache_prefix))
    try:
        os.makedirs(cache_parent, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the index cache directory {cache_parent}: {e.strerror}; "
            f"set data.data_cache_dir to a writable directory"
        ) from None

    samples_built = (num_epochs * tokens_per_epoch - 1) // seq_length if pack_impl == "packed" else num_samples
    fits = _expected(pack_impl, documents, num_samples, samples_built, num_epochs or 0)
    legacy = None
    if pack_impl == "packed":
        legacy = index_file_paths(legacy_index_file_prefix(data_prefix, name, num_samples, seq_length, seed, cache_dir))

    def load():
        return _load_cached(paths, fits) or (legacy and _load_cached(legacy, fits)) or None

    cached = load()
    if cached is not None:
        return cached
    with _exclusive(cache_prefix + ".lock"):
        cached = load()  # another process may have built it while we waited
        if cached is not None:
            # its builder removed the lock file, but a process that arrived after that made a new one
            with contextlib.suppress(OSError):
                os.remove(cache_prefix + ".lock")
            return cached
        if any(os.path.isfile(p) for p in paths.values()):
            warnings.warn(
                f"{cache_prefix}_*.npy: cached index does not match this data (changed split or "
                f"dataset?); rebuilding it",
                stacklevel=2,
            )
        t0 = time.perf_counter()
        arrays = _build_arrays(
            pack_impl,
            documents,
            sizes,
            num_samples,
            seq_length,
            seed,
            num_epochs,
            allow_chopped,
            label_dataset,
            data_prefix,
        )
        for key, arr in zip(("doc_idx", "sample_idx", "shuffle_idx"), arrays):
            _save(paths[key], arr)
        if verbose:
            epochs = f"{num_epochs} epoch(s), " if pack_impl == "packed" else ""
            print(
                f" > built {name} index ({pack_impl}) for {data_prefix}: {epochs}"
                f"{arrays[1].shape[0] - 1} samples in {time.perf_counter() - t0:.2f}s"
            )
        cached = _load_cached(paths, fits)
        # Safe to drop while held: a process still waiting on it re-checks and finds the files in place.
        with contextlib.suppress(OSError):
            os.remove(cache_prefix + ".lock")
    if cached is None:
        raise DataError(f"{cache_prefix}_*.npy: index cache unreadable right after writing it; check the disk")
    return cached


class GPT2Dataset:
    """Samples of ``seq_length + 1`` tokens in GPT-NeoX order (``pack_impl`` packed, pack_until_overflow or
    unpacked; the last two pad short samples with -100 and cut long ones).

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
        pack_impl: str = "packed",
        allow_chopped: bool = True,
    ):
        self.name = name
        self.pack_impl = pack_impl
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
            pack_impl=pack_impl,
            allow_chopped=allow_chopped,
            label_dataset=label_dataset,
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
        if last >= len(self.doc_idx):
            # the last pack_until_overflow sample, where GPT-NeoX's fallback lands on it again (it would
            # recurse without end): its documents without the overlap token
            return [dataset.get(int(self.doc_idx[i])) for i in range(first, len(self.doc_idx))]
        if first == last:
            return [dataset.get(int(self.doc_idx[first]), offset=off_f, length=off_l - off_f + 1)]
        pieces = [dataset.get(int(self.doc_idx[first]), offset=off_f)]
        pieces.extend(dataset.get(int(self.doc_idx[i])) for i in range(first + 1, last))
        # an empty next document has no overlap token to give (GPT-NeoX reads past it into the .bin)
        nxt = int(self.doc_idx[last])
        pieces.append(dataset.get(nxt, length=min(off_l + 1, int(dataset.sizes[nxt]))))
        return pieces

    def _sample(self, idx: int) -> int:
        """The built sample that served index ``idx`` reads."""
        i = int(self.shuffle_idx[self._wrap(idx)])
        if int(self.sample_idx[i + 1][0]) >= len(self.doc_idx) and len(self) > 0:
            # pack_until_overflow's last sample has no next document for its overlap token; GPT-NeoX's
            # IndexError handler then serves index (shuffled index mod length) instead
            i = int(self.shuffle_idx[self._wrap(i % len(self))])
        return i

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if idx < 0:
            raise IndexError(f"negative sample index {idx}")
        i = self._sample(idx)
        first, off_f = (int(v) for v in self.sample_idx[i])
        last, off_l = (int(v) for v in self.sample_idx[i + 1])
        want = self.seq_length + 1
        # only the packed order is exactly seq_length + 1 tokens by construction: a longer one is damage there
        cut = self.pack_impl == "packed"
        pieces = self._pieces(self.indexed_dataset, first, last, off_f, off_l)
        text = np.concatenate(pieces).astype(np.int64)
        item = {}
        if self.label_dataset is None:
            item["text"] = _fit(text, want, pad=-100, warn=cut)
        else:
            label = np.concatenate(self._pieces(self.label_dataset, first, last, off_f, off_l)).astype(np.int64)
            item["text"] = _fit(text, want, pad=0, warn=cut)
            item["label"] = _fit(label, want, pad=-100, warn=cut)
        if self.return_segments:
            lengths = [len(p) for p in pieces]
            segments = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
            item["segment"] = _fit(segments, want, pad=len(lengths), warn=cut)
        return item

    def document_ids(self, idx: int) -> np.ndarray:
        """The dataset's document ids that sample ``idx`` draws tokens from, in order."""
        i = self._sample(int(idx))
        return np.asarray(self.doc_idx[int(self.sample_idx[i][0]) : int(self.sample_idx[i + 1][0]) + 1])


def _fit(arr: np.ndarray, n: int, pad: int, warn: bool = True) -> np.ndarray:
    if len(arr) < n:
        return np.concatenate([arr, np.full(n - len(arr), pad, dtype=arr.dtype)])
    if len(arr) > n:
        if warn:
            warnings.warn(f"sample of {len(arr)} tokens truncated to {n}", stacklevel=3)
        return arr[:n]
    return arr
