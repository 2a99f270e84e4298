"""GPT-NeoX / Megatron "mmap" indexed datasets: a flat ``PREFIX.bin`` of tokens and a ``PREFIX.idx`` index.

The byte layout is GPT-NeoX's ``megatron/data/indexed_dataset.py`` (MMapIndexedDataset), so files written here
load there and theirs load here::

    .idx  magic   b"MMIDIDX\\x00\\x00"                  9 bytes
          version <Q = 1                              8 bytes
          dtype   <B code (DTYPES below)              1 byte
          len     <Q number of items (sequences)      8 bytes
          docs    <Q number of doc_idx entries        8 bytes
          sizes    int32[len]    tokens per item
          pointers int64[len]    byte offset of each item in .bin
          doc_idx  int64[docs]   item index where each document starts, then len
    .bin  the items' tokens back to back, in dtype

Every check that can be done at open is done at open, so a truncated or mismatched pair fails there with the
file's name instead of as garbage tokens deep inside training.

Beside the pair, ``IndexedDatasetBuilder.finalize`` writes ``PREFIX.checksums.json`` (the sidecar): each file's
size and sha256, and the sha256 of a few fixed-size blocks at offsets that depend only on the size, so that a
reader can check a sample in milliseconds (``check_sample``, run when training opens a dataset) and
``verify`` can check everything. GPT-NeoX / Megatron files have no sidecar and stay readable unverified.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import struct

import numpy as np

from neox.errors import DataError, NeoxError, ensure_dir

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34

# GPT-NeoX's code table (current main: 6 is float32 and 7 float64; 8 was added later for uint16).
DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
_CODES = {np.dtype(t): c for c, t in DTYPES.items()}

CHECKSUM_SUFFIX = ".checksums.json"
CHECKSUM_FORMAT = "neox-indexed-checksums"
SAMPLE_BLOCKS = 16  # blocks checked per file at start: at most 16 x 64 KiB read, whatever the file's size
SAMPLE_BLOCK_BYTES = 1 << 16


def dtype_code(dtype) -> int:
    """The .idx code of a numpy dtype; raises NeoxError for a dtype the format cannot store."""
    try:
        return _CODES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise NeoxError(
            f"dtype {dtype!r} cannot be stored in an indexed dataset; use one of "
            f"{', '.join(np.dtype(t).name for t in DTYPES.values())}"
        ) from None


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 when every id fits with room to spare (GPT-NeoX's rule: vocab < 65500), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return str(prefix) + ".bin"


def index_file_path(prefix: str) -> str:
    return str(prefix) + ".idx"


def strip_suffix(path: str) -> str:
    """Accept PREFIX, PREFIX.bin or PREFIX.idx and return PREFIX."""
    path = str(path)
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def checksum_file_path(prefix: str) -> str:
    return str(prefix) + CHECKSUM_SUFFIX


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def _map(path: str) -> np.ndarray:
    # np.memmap refuses zero-length files; an empty dataset is legal, so give it an empty buffer.
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, mode="r", dtype=np.uint8, order="C")


class IndexedDataset:
    """Zero-copy reader: ``ds[i]`` is a numpy view into the memory-mapped .bin (read-only).

    ``len(ds)`` counts items (GPT-NeoX writes one item per document); ``doc_idx`` maps documents to items.
    """

    def __init__(self, prefix: str, warmup: bool = False):
        self._open(strip_suffix(prefix), warmup)

    def _open(self, prefix: str, warmup: bool) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(
                    f"{p}: no such file; an indexed dataset needs both PREFIX.bin and PREFIX.idx "
                    f"(give the prefix, e.g. data/corpus_text_document)"
                )
        idx_bytes = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[: len(MAGIC)] != MAGIC:
            raise DataError(
                f"{idx_path}: not a GPT-NeoX mmap index (bad magic {head[:9]!r}, want {MAGIC!r}); "
                f"only --dataset-impl mmap files are supported"
            )
        if len(head) < HEADER_BYTES:
            raise DataError(f"{idx_path}: truncated header ({idx_bytes} bytes); re-run preprocessing")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise DataError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
        code = head[17]
        if code not in DTYPES:
            raise DataError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self._dtype = np.dtype(DTYPES[code])
        n, n_doc = struct.unpack("<QQ", head[18:34])
        want = HEADER_BYTES + n * 4 + n * 8 + n_doc * 8
        if idx_bytes != want:
            what = "truncated" if idx_bytes < want else "has trailing bytes"
            raise DataError(
                f"{idx_path}: index {what}: {idx_bytes} bytes, but the header's {n} items and "
                f"{n_doc} doc_idx entries need {want}; re-run preprocessing"
            )

        self._idx_buf = _map(idx_path)
        off = HEADER_BYTES
        self._sizes = np.frombuffer(self._idx_buf, dtype=np.int32, count=n, offset=off)
        off += n * 4
        self._pointers = np.frombuffer(self._idx_buf, dtype=np.int64, count=n, offset=off)
        off += n * 8
        self._doc_idx = np.frombuffer(self._idx_buf, dtype=np.int64, count=n_doc, offset=off)

        bin_bytes = os.path.getsize(bin_path)
        expected = int(self._pointers[-1]) + int(self._sizes[-1]) * self._dtype.itemsize if n else 0
        if bin_bytes != expected:
            raise DataError(
                f"{bin_path}: {bin_bytes} bytes, but {idx_path} describes {expected} "
                f"({'truncated .bin' if bin_bytes < expected else '.bin and .idx do not belong together'}); "
                f"re-run preprocessing for this prefix"
            )
        if n and (
            self._sizes.min() < 0
            or self._pointers[0] != 0
            or np.any(np.diff(self._pointers) != self._sizes[:-1].astype(np.int64) * self._dtype.itemsize)
        ):
            raise DataError(f"{idx_path}: sizes and pointers disagree (corrupt index); re-run preprocessing")
        if n_doc and (self._doc_idx[0] < 0 or self._doc_idx[-1] > n or np.any(np.diff(self._doc_idx) < 0)):
            raise DataError(f"{idx_path}: doc_idx is not an increasing list of item indices in [0, {n}]")

        self._bin_buf = _map(bin_path)
        if warmup:
            # Touch every page once so the first epoch does not pay for page faults (GPT-NeoX mmap_warmup).
            for start in range(0, len(self._bin_buf), 1 << 26):
                self._bin_buf[start : start + (1 << 26)].sum()

    # Datasets travel to DataLoader workers by pickling: send the path and map the files again there.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self._open(state["prefix"], warmup=False)

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("indexed dataset slices must be contiguous (step 1)")
            if start >= stop:
                return []
            sizes = self._sizes[start:stop]
            flat = np.frombuffer(
                self._bin_buf,
                dtype=self._dtype,
                count=int(sizes.sum(dtype=np.int64)),
                offset=int(self._pointers[start]),
            )
            return np.split(flat, np.cumsum(sizes)[:-1])
        i = int(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {idx} out of range for {self.prefix} ({len(self)} items)")
        return np.frombuffer(self._bin_buf, dtype=self._dtype, count=int(self._sizes[i]), offset=int(self._pointers[i]))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of item ``idx`` (to its end when length is None), zero-copy."""
        size = int(self._sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"get({idx}, offset={offset}, length={length}) outside item of {size} tokens")
        return np.frombuffer(
            self._bin_buf,
            dtype=self._dtype,
            count=length,
            offset=int(self._pointers[idx]) + offset * self._dtype.itemsize,
        )

    def all_tokens(self) -> np.ndarray:
        """Every token of every item, back to back, as one zero-copy array."""
        return np.frombuffer(self._bin_buf, dtype=self._dtype)

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_tokens(self) -> int:
        return int(self._sizes.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return max(len(self._doc_idx) - 1, 0)

    @staticmethod
    def exists(prefix: str) -> bool:
        return dataset_exists(strip_suffix(prefix))


class IndexedDatasetBuilder:
    """Writer: ``add_item`` tokens, ``end_document`` after each document, then ``finalize()``.

    Both files are written under ``.tmp`` names and renamed into place by ``finalize``: a run that dies
    part-way leaves no half-written dataset that looks complete. Use it as a context manager to also remove
    the temporary files when an exception escapes.
    """

    def __init__(self, out: str, dtype=np.int32):
        self.prefix = strip_suffix(out)
        self.bin_path = data_file_path(self.prefix)
        self.idx_path = index_file_path(self.prefix)
        self._dtype = np.dtype(dtype)
        self._code = dtype_code(self._dtype)
        self._info = np.iinfo(self._dtype) if self._dtype.kind in "iu" else None
        ensure_dir(os.path.dirname(os.path.abspath(self.bin_path)), "output prefix")
        self._tmp_bin = self.bin_path + ".tmp"
        try:
            self._file = open(self._tmp_bin, "wb")
        except OSError as e:
            raise DataError(f"{self._tmp_bin}: cannot write ({e.strerror}); choose a writable output prefix") from None
        # array('q') holds 8 bytes per entry, a Python list ~36: index memory stays small for big corpora.
        self._sizes = array.array("q")
        self._doc_idx = array.array("q", [0])
        self._open_size = 0
        self._bin_hash = hashlib.sha256()

    def _write(self, data) -> None:
        self._file.write(data)
        self._bin_hash.update(data)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _as_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.dtype != self._dtype:
            if self._info is not None and arr.size and arr.dtype.kind in "iu":
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._info.min or hi > self._info.max:
                    bad = lo if lo < self._info.min else hi
                    raise NeoxError(
                        f"{self.bin_path}: token id {bad} does not fit {self._dtype.name}; "
                        f"write with a wider dtype (int32)"
                    )
            arr = arr.astype(self._dtype)
        return arr.reshape(-1)

    def add_item(self, tokens) -> None:
        """Append one item (a sequence of token ids)."""
        self.write_tokens(tokens)
        self.close_item()

    def write_tokens(self, tokens) -> None:
        """Append tokens to the item being written; ``close_item`` ends it. Lets a long item arrive in parts."""
        arr = self._as_tokens(tokens)
        self._write(arr.tobytes(order="C"))
        self._open_size += arr.size

    def close_item(self) -> None:
        self._sizes.append(self._open_size)
        self._open_size = 0

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, flat, sizes) -> None:
        """Append many one-item documents in one write: ``flat`` is their tokens back to back."""
        if self._open_size:
            raise ValueError("add_documents while an item is open; call close_item first")
        arr = self._as_tokens(flat)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != arr.size:
            raise ValueError(f"sizes sum to {int(sizes.sum())} but {arr.size} tokens were given")
        self._write(arr.tobytes(order="C"))
        start = len(self._sizes)
        self._sizes.extend(sizes.tolist())
        self._doc_idx.extend(range(start + 1, start + len(sizes) + 1))

    def merge_file_(self, prefix: str) -> None:
        """Append a whole finished dataset (its items and its documents)."""
        other = IndexedDataset(prefix)
        if other.dtype != self._dtype:
            raise NeoxError(
                f"{other.prefix}: dtype {other.dtype.name} differs from the output's "
                f"{self._dtype.name}; datasets can only be merged when their dtypes match"
            )
        base = len(self._sizes)
        self._sizes.extend(other.sizes.astype(np.int64).tolist())
        # GPT-NeoX's merge drops the other file's document boundaries; keeping them keeps documents intact.
        doc_idx = other.doc_idx[1:] if len(other.doc_idx) else other.doc_idx
        self._doc_idx.extend((doc_idx + base).tolist())
        with open(data_file_path(other.prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._write(chunk)

    def finalize(self, index_file: str | None = None) -> None:
        """Write the index and move both files into place (``index_file`` defaults to PREFIX.idx)."""
        idx_path = index_file or self.idx_path
        if self._open_size:
            raise ValueError("finalize with an item still open; call close_item first")
        self._file.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if len(self._sizes) else np.zeros(0, np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise NeoxError(
                f"{self.bin_path}: an item of {int(sizes.max())} tokens exceeds the format's int32 "
                f"size field; split long documents"
            )
        pointers = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1] * self._dtype.itemsize, out=pointers[1:])
        tmp_idx = idx_path + ".tmp"
        idx_hash = hashlib.sha256()
        with open(tmp_idx, "wb") as f:
            for part in (
                MAGIC,
                struct.pack("<Q", VERSION),
                struct.pack("<B", self._code),
                struct.pack("<Q", sizes.size),
                struct.pack("<Q", len(self._doc_idx)),
                sizes.astype(np.int32).tobytes(),
                pointers.tobytes(),
                np.frombuffer(self._doc_idx, dtype=np.int64).tobytes(),
            ):
                f.write(part)
                idx_hash.update(part)
        sidecar = checksum_file_path(strip_suffix(idx_path))
        record = {
            "format": CHECKSUM_FORMAT,
            "version": 1,
            "block_bytes": SAMPLE_BLOCK_BYTES,
            "bin": _file_record(self._tmp_bin, self._bin_hash.hexdigest()),
            "idx": _file_record(tmp_idx, idx_hash.hexdigest()),
        }
        with open(sidecar + ".tmp", "w") as f:
            f.write(json.dumps(record) + "\n")
        # The old sidecar goes first and the new one comes last: a run that dies in between leaves files with
        # no sidecar (unverified) or a stale one (a mismatch error), never a wrong pair that passes the check.
        # .bin before .idx: if we die between those renames, the stale .idx no longer matches and open() says so.
        if os.path.exists(sidecar):
            os.remove(sidecar)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, idx_path)
        os.replace(sidecar + ".tmp", sidecar)

    def abort(self) -> None:
        """Close and delete the temporary output (nothing is left behind)."""
        if not self._file.closed:
            self._file.close()
        for p in (self._tmp_bin, self.idx_path + ".tmp", checksum_file_path(self.prefix) + ".tmp"):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


# ---- integrity: the checksum sidecar -------------------------------------------------------------------------

REBUILD = "rebuild it with neox preprocess (or neox data merge)"


def sample_offsets(size: int, blocks: int = SAMPLE_BLOCKS, block_bytes: int = SAMPLE_BLOCK_BYTES) -> list[int]:
    """Offsets of the sampled blocks of a file of ``size`` bytes: evenly spaced, first and last included; a file
    of up to ``blocks`` blocks is covered whole. They depend only on the size, so writer and reader agree."""
    if size <= blocks * block_bytes:
        return list(range(0, size, block_bytes))
    span = size - block_bytes
    return [span * k // (blocks - 1) for k in range(blocks)]


def _sha256(path: str, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = f.read(1 << 24 if left is None else min(left, 1 << 24))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _file_record(path: str, sha256: str) -> dict:
    size = os.path.getsize(path)
    blocks = [[o, _sha256(path, o, SAMPLE_BLOCK_BYTES)] for o in sample_offsets(size)]
    return {"bytes": size, "sha256": sha256, "blocks": blocks}


def _is_sha(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _valid_record(rec) -> bool:
    if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or not _is_sha(rec.get("sha256")):
        return False
    blocks = rec.get("blocks")
    return isinstance(blocks, list) and all(
        isinstance(b, list) and len(b) == 2 and isinstance(b[0], int) and _is_sha(b[1]) for b in blocks
    )


def read_checksums(prefix: str) -> dict | None:
    """The sidecar of ``prefix`` (None when there is none: a GPT-NeoX/Megatron dataset); DataError when damaged."""
    path = checksum_file_path(prefix)
    if not os.path.isfile(path):
        return None
    fix = f"delete it to use the data unverified, or {REBUILD}"
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read().decode("utf-8"))
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"{path}: unreadable checksum file ({type(e).__name__}); {fix}") from None
    if (
        not isinstance(rec, dict)
        or rec.get("format") != CHECKSUM_FORMAT
        or rec.get("version") != 1
        or not isinstance(rec.get("block_bytes"), int)
        or rec["block_bytes"] < 1
        or not all(_valid_record(rec.get(k)) for k in ("bin", "idx"))
    ):
        raise DataError(f"{path}: not a {CHECKSUM_FORMAT} version 1 file (damaged?); {fix}")
    return rec


def _check_size(path: str, rec: dict, sidecar: str) -> int:
    size = os.path.getsize(path)
    if size != rec["bytes"]:
        raise DataError(
            f"{path}: {size} bytes, but {sidecar} records {rec['bytes']}: the file changed after it was written; "
            f"{REBUILD}"
        )
    return size


def _check_blocks(path: str, rec: dict, block_bytes: int, sidecar: str) -> None:
    size = rec["bytes"]
    for offset, sha in rec["blocks"]:
        if not 0 <= offset < max(size, 1) or _sha256(path, offset, block_bytes) != sha:
            raise DataError(
                f"{path}: the {block_bytes}-byte block at offset {offset} differs from {sidecar}: the file is "
                f"corrupt; {REBUILD}"
            )


def _checked_files(prefix: str, rec: dict) -> list:
    pairs = [(index_file_path(prefix), rec["idx"]), (data_file_path(prefix), rec["bin"])]
    for path, file_rec in pairs:  # both sizes first: a replaced pair reads as "changed", not as "corrupt"
        _check_size(path, file_rec, checksum_file_path(prefix))
    for path, file_rec in pairs:
        _check_blocks(path, file_rec, rec["block_bytes"], checksum_file_path(prefix))
    return pairs


def check_sample(prefix: str) -> bool:
    """Sizes and the sampled blocks of both files against the sidecar (cheap: at start of training).

    True when checked, False when there is no sidecar; DataError naming the file when anything differs."""
    prefix = strip_suffix(prefix)
    rec = read_checksums(prefix)
    if rec is None:
        return False
    _checked_files(prefix, rec)
    return True


def verify(prefix: str) -> tuple[IndexedDataset, bool]:
    """Everything: with a sidecar, sizes, blocks and full sha256 of both files (first, so that the damaged file
    is the one named); then the .idx structure against the .bin. Returns the dataset and whether a sidecar
    was checked; DataError naming the file at the first problem."""
    prefix = strip_suffix(prefix)
    for p in (index_file_path(prefix), data_file_path(prefix)):
        if not os.path.isfile(p):
            IndexedDataset(prefix)  # its missing-file error
    rec = read_checksums(prefix)
    if rec is not None:
        for path, file_rec in _checked_files(prefix, rec):
            if _sha256(path) != file_rec["sha256"]:
                raise DataError(
                    f"{path}: sha256 differs from {checksum_file_path(prefix)}: the file is corrupt; {REBUILD}"
                )
    ds = IndexedDataset(prefix)  # magic, version, dtype, sizes/pointers/doc_idx and the .bin's size
    n, doc_idx = len(ds), ds.doc_idx
    if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != n:
        first_last = f"{int(doc_idx[0])} .. {int(doc_idx[-1])}" if len(doc_idx) else "empty"
        raise DataError(
            f"{index_file_path(prefix)}: doc_idx should run from 0 to the item count {n}, but is {first_last}; "
            f"{REBUILD}"
        )
    return ds, rec is not None
