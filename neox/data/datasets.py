"""Build the train / valid / test datasets from ``cfg.data``, the way GPT-NeoX's ``data_utils.py`` does.

Two layouts, as in GPT-NeoX:

* one ``data_path``: its documents are split by ``split`` ("969,30,1") into contiguous train/valid/test
  ranges; each range is one ``GPT2Dataset`` named "train" / "valid" / "test";
* ``train_data_paths`` (+ ``valid_data_paths``, ``test_data_paths``): each prefix is a whole ``GPT2Dataset``
  named "train_0", "valid_0", ... and each list is blended by its weights (``BlendableDataset``), optionally
  re-weighted by document count (``weight_by_num_documents``). ``label_data_paths`` pair label datasets
  with the training prefixes.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from neox.config.validate import split_proportions
from neox.data.blend import BlendableDataset, normalized_weights_and_num_samples, weights_by_num_docs
from neox.data.indexed import (
    IndexedDataset,
    check_sample,
    checksum_file_path,
    data_file_path,
    dataset_exists,
    index_file_path,
    strip_suffix,
)
from neox.data.sampling import GPT2Dataset
from neox.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")


def parse_split(split: str, num_documents: int) -> list[int]:
    """Document boundaries [0, a, b, num_documents] for a "train,valid,test" proportion string.

    GPT-NeoX's rule: each boundary is rounded, and any rounding excess is taken off every boundary so the
    last one is the document count.
    """
    bounds = [0]
    for v in split_proportions(split):
        bounds.append(bounds[-1] + round(v * float(num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return bounds


def num_samples_for(train_iters: int, global_batch: int, eval_interval: int, eval_iters: int) -> tuple[int, int, int]:
    """GPT-NeoX's sample counts: all training steps; one eval per interval plus one; one test run."""
    valid_iters = (train_iters // eval_interval + 1) * eval_iters if eval_interval > 0 else eval_iters
    return train_iters * global_batch, valid_iters * global_batch, eval_iters * global_batch


def open_indexed(prefix: str, key: str, warmup: bool = False) -> IndexedDataset:
    """Open a .bin/.idx pair, or raise a DataError naming the config key, the missing file and the fix."""
    prefix = strip_suffix(str(prefix))
    if not dataset_exists(prefix):
        missing = index_file_path(prefix) if not os.path.isfile(index_file_path(prefix)) else data_file_path(prefix)
        hint = ""
        if dataset_exists(prefix + "_text_document"):
            hint = f" (did you mean {prefix}_text_document? preprocess appends _text_document)"
        raise DataError(
            f"{key}: not found: {missing}{hint}; run `neox preprocess --input FILE --output-prefix "
            f"PREFIX` to create it and give the prefix without .bin/.idx"
        )
    # the sidecar first, so that a damaged file is named as such; then the index's structure against the .bin
    checked = check_sample(prefix)
    ds = IndexedDataset(prefix, warmup=warmup)
    if not checked and prefix not in _NOTED and os.environ.get("RANK", "0") == "0":
        _NOTED.add(prefix)
        print(
            f"note: {key}: {prefix} has no {checksum_file_path('')} sidecar (written by another tool?): its "
            f"sizes are checked, its contents are not; `neox data verify PREFIX` checks the structure in full",
            file=sys.stderr,
        )
    return ds


_NOTED: set = set()  # prefixes already given the no-sidecar note in this process


def _equal_or_given(weights: list, paths: list, key: str) -> list[float]:
    if not weights:
        return [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ConfigError(f"data.{key}: {len(weights)} weights for {len(paths)} paths; give one weight per path")
    return [float(w) for w in weights]


def _build_split_datasets(data, seq_length, seed, num_samples, return_segments, verbose):
    ds = open_indexed(data.data_path, "data.data_path", data.mmap_warmup)
    bounds = parse_split(data.split, len(ds.sizes))
    out = []
    for i, name in enumerate(SPLITS):
        if bounds[i + 1] <= bounds[i]:
            out.append(None)
            continue
        documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
        out.append(
            GPT2Dataset(
                name,
                ds.prefix,
                documents,
                ds,
                num_samples[i],
                seq_length,
                seed,
                cache_dir=data.data_cache_dir,
                return_segments=return_segments,
                verbose=verbose,
                pack_impl=data.pack_impl,
                allow_chopped=data.allow_chopped,
            )
        )
    return tuple(out)


def _build_list_datasets(data, seq_length, seed, num_samples, return_segments, verbose):
    lists = {name: list(getattr(data, f"{name}_data_paths")) for name in SPLITS}
    label_keys = {name: "label_data_paths" if name == "train" else f"{name}_label_data_paths" for name in SPLITS}
    labels = {name: list(getattr(data, label_keys[name])) for name in SPLITS}
    for name in SPLITS:
        if labels[name] and len(labels[name]) != len(lists[name]):
            raise ConfigError(
                f"data.{label_keys[name]}: {len(labels[name])} label datasets for {len(lists[name])} "
                f"{name}_data_paths; give one label dataset per {name} prefix"
            )
    weights = {
        name: _equal_or_given(list(getattr(data, f"{name}_data_weights")), lists[name], f"{name}_data_weights")
        for name in SPLITS
    }
    opened = {
        name: [open_indexed(p, f"data.{name}_data_paths[{i}]", data.mmap_warmup) for i, p in enumerate(lists[name])]
        for name in SPLITS
    }
    label_sets = {
        name: [open_indexed(p, f"data.{label_keys[name]}[{i}]", data.mmap_warmup) for i, p in enumerate(labels[name])]
        for name in SPLITS
    }

    if data.weight_by_num_documents:
        weights = {
            name: weights_by_num_docs([len(d.sizes) for d in opened[name]], data.weighted_sampler_alpha)
            if opened[name]
            else []
            for name in SPLITS
        }

    out = []
    for s, name in enumerate(SPLITS):
        if not opened[name]:
            out.append(None)
            continue
        norm, counts = normalized_weights_and_num_samples(weights[name], num_samples[s])
        parts = []
        for i, ds in enumerate(opened[name]):
            label = label_sets[name][i] if label_sets[name] else None
            parts.append(
                GPT2Dataset(
                    f"{name}_{i}",
                    ds.prefix,
                    np.arange(len(ds.sizes), dtype=np.int32),
                    ds,
                    counts[i],
                    seq_length,
                    seed,
                    label_dataset=label,
                    cache_dir=data.data_cache_dir,
                    return_segments=return_segments,
                    verbose=verbose,
                    pack_impl=data.pack_impl,
                    allow_chopped=data.allow_chopped,
                )
            )
        out.append(BlendableDataset(parts, norm))
    return tuple(out)


def build_datasets(
    data,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    return_segments: bool = False,
    verbose: bool = False,
):
    """(train, valid, test) datasets for ``cfg.data``; a split without documents or paths is None.

    ``num_samples`` is what each split must be able to serve (see ``num_samples_for``); the index caches
    are named by it, as in GPT-NeoX. ``return_segments`` adds per-token document ordinals to every item.
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    has_lists = any(getattr(data, f"{name}_data_paths") for name in SPLITS)
    for key, paths in (
        ("label_data_paths", "train"),
        ("valid_label_data_paths", "valid"),
        ("test_label_data_paths", "test"),
    ):
        if getattr(data, key) and not getattr(data, f"{paths}_data_paths"):
            raise ConfigError(f"data.{key} needs data.{paths}_data_paths (labels pair with those prefixes)")
    if data.data_path and has_lists:
        raise ConfigError(
            "data.data_path and data.train/valid/test_data_paths are both set; use data_path "
            "(split by data.split) or the path lists, not both"
        )
    if data.data_path:
        return _build_split_datasets(data, seq_length, seed, num_samples, return_segments, verbose)
    if not data.train_data_paths:
        raise ConfigError(
            "no training data: set data.data_path (one prefix split by data.split) or data.train_data_paths"
        )
    return _build_list_datasets(data, seq_length, seed, num_samples, return_segments, verbose)
