"""Fuzz the .idx/.bin reader and its checksum sidecar, the config loader and checkpoint metadata: generated and
mutated inputs either load or raise a NeoxError with a one-line message; any other exception is a bug."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import given
from hypothesis import strategies as st

from neox.config import Config, from_dict, load, to_dict
from neox.data.indexed import IndexedDataset, IndexedDatasetBuilder, check_sample, checksum_file_path, verify
from neox.train.checkpoint import resolve, saved_config
from tests.fuzz.common import fuzz, only_neox_errors

IDX_CASES, CONFIG_CASES, YAML_CASES, CHECKPOINT_CASES = 700, 500, 400, 400

_docs = st.lists(st.lists(st.integers(0, 255), max_size=6), min_size=0, max_size=5)
# (position as a fraction of the file, new byte) edits; a cut keeps that fraction of the file; extra appends
_edits = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4)
_cut = st.none() | st.floats(0, 1)


def _mutate(data: bytes, edits, cut, extra: bytes) -> bytes:
    b = bytearray(data)
    for where, byte in edits:
        if b:
            b[min(int(where * len(b)), len(b) - 1)] = byte
    if cut is not None:
        b = b[: int(cut * len(b))]
    return bytes(b) + extra


@fuzz(IDX_CASES)
@given(
    docs=_docs,
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.int64]),
    target=st.sampled_from(["idx", "bin", "checksums.json", "idx+bin"]),
    edits=_edits,
    cut=_cut,
    extra=st.binary(max_size=9),
    header=st.none() | st.tuples(st.integers(9, 33), st.integers(0, 255)),
)
def test_indexed_reader_only_raises_data_errors(docs, dtype, target, edits, cut, extra, header):
    with tempfile.TemporaryDirectory() as d:
        prefix = str(Path(d) / "ds")
        with IndexedDatasetBuilder(prefix, dtype) as b:
            for doc in docs:
                b.add_document(doc)
            b.finalize()
        for ext in target.split("+"):
            path = Path(checksum_file_path(prefix) if ext.startswith("checksums") else f"{prefix}.{ext}")
            data = _mutate(path.read_bytes(), edits, cut, extra)
            if header is not None and ext == "idx" and len(data) > header[0]:  # the header's counts and dtype
                data = data[: header[0]] + bytes([header[1]]) + data[header[0] + 1 :]
            path.write_bytes(data)
        with only_neox_errors():
            check_sample(prefix)
        with only_neox_errors():
            ds = IndexedDataset(prefix)
            for i in range(len(ds)):  # an index that opens serves every item from inside the .bin
                assert ds[i].size == ds.sizes[i]
            ds[0 : len(ds)]
            ds.all_tokens()
        with only_neox_errors():
            verify(prefix)


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_values = st.recursive(
    _scalars, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=6), v), max_leaves=6
)
_SECTIONS = to_dict(Config())
_KEYS = [(s, k) for s, fields in _SECTIONS.items() for k in fields]


@fuzz(CONFIG_CASES)
@given(
    picks=st.lists(st.tuples(st.sampled_from(_KEYS), _values, st.booleans()), max_size=6),
    junk=st.dictionaries(st.text(max_size=8), _values, max_size=2),
)
def test_from_dict_only_raises_config_errors(picks, junk):
    d: dict = {}
    for (section, key), value, flat in picks:
        if flat:  # GPT-NeoX style: top-level keys
            d[key] = value
        else:
            d.setdefault(section, {})[key] = value
    d.update(junk)
    with only_neox_errors():
        from_dict(d)


_good_yaml = yaml.safe_dump(_SECTIONS, sort_keys=False)


@fuzz(YAML_CASES)
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.tuples(st.floats(0, 1), st.text(max_size=20)).map(
            lambda t: _good_yaml[: int(t[0] * len(_good_yaml))] + t[1]  # a real config cut and extended
        ),
    ),
    raw=st.binary(max_size=40),
    suffix=st.sampled_from([".yml", ".yaml", ".json"]),
)
def test_yaml_files_only_raise_config_errors(text, raw, suffix):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"cfg{suffix}"
        f.write_text(text, encoding="utf-8", errors="surrogateescape")
        with only_neox_errors():
            load([str(f)], announce=False)
        f.write_bytes(raw)  # not even text
        with only_neox_errors():
            load([str(f)], announce=False)


@fuzz(CHECKPOINT_CASES)
@given(
    # valid UTF-8 only: a `latest` file that is not text is a known escape (test_latest_not_utf8 below)
    latest=st.none()
    | st.text(max_size=30).map(str.encode)
    | st.sampled_from([b"iter_0000001\n", b"../x", b"/", b"", b"."]),
    metadata=st.booleans(),
    config=st.none() | st.binary(max_size=80) | st.sampled_from([_good_yaml.encode(), b"model: [\n", b"- 1\n"]),
)
def test_checkpoint_metadata_only_raises_neox_errors(latest, metadata, config):
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        ckpt = run / "iter_0000001"
        ckpt.mkdir(parents=True)
        if metadata:
            (ckpt / ".metadata").write_bytes(b"")
        if latest is not None:
            (run / "latest").write_bytes(latest)
        if config is not None:
            (ckpt / "config.yml").write_bytes(config)
        with only_neox_errors():
            assert resolve(run).is_dir()
        with only_neox_errors():
            assert isinstance(saved_config(run), dict)


def test_latest_not_utf8(tmp_path):
    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / "latest").write_bytes(b"\x80")
    with only_neox_errors():
        resolve(tmp_path)
