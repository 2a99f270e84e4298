"""Preference data: pairwise JSONL (``prompt``, ``chosen``, ``rejected``) for DPO and reward models, unpaired
JSONL (``prompt``, ``completion``, ``label``: true = desirable) for KTO.

Preprocessing writes GPT-NeoX-format datasets, one document per line, with label datasets that are -100 over
the prompt (the loss and the log-probabilities count the completion only):

    pairs:    {prefix}_chosen_document, {prefix}_chosen_label_document,
              {prefix}_rejected_document, {prefix}_rejected_label_document
              (GPT-NeoX's pos_/neg_{split}_data_paths and pos_/neg_{split}_label_data_paths)
    unpaired: {prefix}_completion_document, {prefix}_completion_label_document,
              {prefix}_reward_document (one value per document: 1 desirable, -1 undesirable;
              GPT-NeoX's {split}_reward_data_paths)

Training reads them one document per sample (never packed: a preference is about a whole completion), cut or
padded to seq_length + 1, in a seeded order reshuffled every epoch; the batch of a pair step holds the chosen
rows first and the rejected rows after them, each row's pair number in ``pair_index``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from neox.data.datasets import open_indexed
from neox.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from neox.data.loader import collate, micro_batch_indices
from neox.data.preprocess import IGNORE_INDEX, Summary
from neox.data.readers import iter_json_lines
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError, DataError

PAIR_KEYS = ("prompt", "chosen", "rejected")
UNPAIRED_KEYS = ("prompt", "completion", "label")


def _records(inputs, keys: tuple | None) -> Iterator[tuple[str, dict]]:
    """(file:line, object) of every non-blank line; a malformed one is a one-line DataError naming it.
    keys None: a pair line (prompt, chosen, rejected) or a completion line (prompt, completion), as scored."""
    for where, obj, _ in iter_json_lines(inputs):
        if keys is None:
            keys = PAIR_KEYS if isinstance(obj, dict) and "chosen" in obj else ("prompt", "completion")
            fixed = None
        else:
            fixed = keys
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with {', '.join(keys)}")
        for key in keys:
            want = bool if key == "label" else str
            if not isinstance(obj.get(key), want):
                what = "missing" if key not in obj else f"a {type(obj[key]).__name__}"
                raise DataError(
                    f"{where}: key {key!r} is {what}; each line needs {', '.join(keys)} "
                    f"({'true/false' if want is bool else 'strings'})"
                )
        yield where, obj
        keys = fixed


def scoring_records(inputs) -> Iterator[tuple[str, dict]]:
    """Lines to score with a reward model: pairs (prompt, chosen, rejected) or (prompt, completion)."""
    return _records(inputs, None)


def encode_completion(tok, prompt: str, completion: str, append_eod: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) of prompt + completion (+ EOD), labels -100 over the prompt: what training reads."""
    return _encode(tok, prompt, completion, append_eod)


def _encode(tok, prompt: str, completion: str, append_eod: bool) -> tuple[np.ndarray, np.ndarray]:
    p, c = tok.encode(prompt), tok.encode(completion) + ([tok.eod_id] if append_eod else [])
    if not c:
        raise DataError("an empty completion")
    tokens = np.asarray(p + c, dtype=np.int64)
    labels = tokens.astype(np.int32)
    labels[: len(p)] = IGNORE_INDEX
    return tokens, labels


@dataclass
class PreferenceOptions:
    inputs: list
    output_prefix: str
    kind: str = "pairs"  # "pairs" (prompt, chosen, rejected) or "unpaired" (prompt, completion, label)
    append_eod: bool = True
    dtype: str | None = None


def preprocess_preferences(opts: PreferenceOptions, tokenizer_cfg) -> Summary:
    """Tokenize preference JSONL into the datasets of the module docstring."""
    if opts.kind not in ("pairs", "unpaired"):
        raise ConfigError(f"--preference: {opts.kind!r}; use pairs or unpaired")
    tok = build_tokenizer(tokenizer_cfg)
    dtype = np.dtype(opts.dtype) if opts.dtype else best_fitting_dtype(tok.vocab_size)
    sides = ("chosen", "rejected") if opts.kind == "pairs" else ("completion",)
    paths = {}
    for side in sides:
        paths[side] = f"{opts.output_prefix}_{side}_document"
        paths[f"{side}_label"] = f"{opts.output_prefix}_{side}_label_document"
    if opts.kind == "unpaired":
        paths["reward"] = f"{opts.output_prefix}_reward_document"
    builders = {k: IndexedDatasetBuilder(p, dtype if k in sides else np.int32) for k, p in paths.items()}
    summary = Summary(dtype=dtype.name)
    try:
        for where, obj in _records(opts.inputs, PAIR_KEYS if opts.kind == "pairs" else UNPAIRED_KEYS):
            for side in sides:
                try:
                    tokens, labels = _encode(tok, obj["prompt"], obj[side], opts.append_eod)
                except DataError as e:
                    raise DataError(f"{where}: {side}: {e}") from None
                builders[side].add_document(tokens.astype(dtype))
                builders[f"{side}_label"].add_document(labels)
                summary.tokens += len(tokens)
            if opts.kind == "unpaired":
                builders["reward"].add_document(np.asarray([1 if obj["label"] else -1], dtype=np.int32))
            summary.documents += 1
        if summary.documents == 0:
            raise DataError(f"--input {','.join(map(str, opts.inputs))}: no preference records to write")
        for b in builders.values():
            b.finalize()
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    summary.outputs = paths
    return summary


class _Side:
    """One document per sample of a text + label dataset pair, as collate's items (cut or padded)."""

    def __init__(self, text: str, label: str, key: str, length: int):
        self.text = open_indexed(text, key)
        self.label = open_indexed(label, key.replace("_data_paths", "_label_data_paths"))
        if not np.array_equal(self.text.sizes, self.label.sizes):
            raise DataError(f"{key}: {text} and its label dataset {label} differ in document sizes")
        self.length = length

    def __len__(self) -> int:
        return len(self.text.sizes)

    def item(self, doc: int) -> dict:
        n = self.length
        text = np.full(n, -1, dtype=np.int64)
        label = np.full(n, IGNORE_INDEX, dtype=np.int64)
        t, lab = self.text[doc][:n], self.label[doc][:n]
        text[: len(t)], label[: len(lab)] = t, lab
        return {"text": text, "label": label}


class EpochOrder:
    """Sample i -> document ``permutation(epoch)[i % n]``, a seeded permutation per epoch (the last one kept)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._order: dict[int, np.ndarray] = {}

    def document(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._order:
            self._order = {epoch: np.random.RandomState((self.seed + epoch) % 2**32).permutation(self.n)}
        return int(self._order[epoch][i % self.n])


class PreferenceDataset:
    """Pairs (``chosen`` and ``rejected`` sides) or unpaired completions with a reward, one per sample.

    Sample i is document ``order(i // n)[i % n]``: a seeded permutation per epoch, so any sample index is
    served (training loops) and the same index always gives the same document on every rank and resume.
    """

    def __init__(self, sides: dict, seq_length: int, seed: int, rewards=None, name: str = "train"):
        sizes = {len(s) for s in sides.values()}
        if len(sizes) != 1:
            raise DataError(f"{name}: the pos and neg datasets hold {sorted(sizes)} documents; a pair needs both")
        self.sides, self.seed, self.rewards = sides, seed, rewards
        self.n = sizes.pop()
        if rewards is not None and len(rewards) != self.n:
            raise DataError(f"{name}: {len(rewards)} rewards for {self.n} completions")
        self.seq_length = seq_length
        self.order = EpochOrder(self.n, seed)

    def __len__(self) -> int:
        return self.n

    def document(self, i: int) -> int:
        return self.order.document(i)

    def batch(self, indices, eod_id: int) -> dict:
        """The batch of samples ``indices`` (in the seeded order)."""
        return self.batch_documents([self.document(int(i)) for i in indices], eod_id)

    def batch_documents(self, docs, eod_id: int) -> dict:
        """The batch of documents ``docs``: every side's rows, side after side."""
        docs = list(docs)
        items = [side.item(d) for side in self.sides.values() for d in docs]
        out = collate(items, eod_id=eod_id)
        out["pair_index"] = torch.tensor(docs, dtype=torch.int64)
        if self.rewards is not None:
            out["reward"] = torch.tensor([float(self.rewards[d]) for d in docs], dtype=torch.float32)
        return out


def preference_batches(
    dataset: PreferenceDataset,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
    *,
    eod_id: int,
    loop: bool = False,
) -> Iterator[dict]:
    """This rank's micro-batches from ``start_sample`` on: [chosen rows; rejected rows] for pairs."""
    for idx in micro_batch_indices(len(dataset), micro_batch, dp_rank, dp_size, start_sample, loop):
        yield dataset.batch(idx, eod_id)


def _paths(data, split: str, kind: str) -> list:
    return list(getattr(data, f"{kind}_{split}_data_paths"))


def build_preference_datasets(data, seq_length: int, seed: int, paired: bool) -> tuple:
    """(train, valid, test) from GPT-NeoX's pos_/neg_ keys (pairs) or {split}_data_paths with
    {split}_reward_data_paths (unpaired); None for a split without paths. One prefix per split."""
    out = []
    for split in ("train", "valid", "test"):
        if paired:
            pos, neg = _paths(data, split, "pos"), _paths(data, split, "neg")
            pos_l, neg_l = data_labels(data, split, "pos"), data_labels(data, split, "neg")
            if not pos and not neg:
                out.append(None)
                continue
            _one(f"pos_{split}_data_paths", pos, neg, pos_l, neg_l)
            sides = {
                "chosen": _Side(pos[0], pos_l[0], f"data.pos_{split}_data_paths", seq_length + 1),
                "rejected": _Side(neg[0], neg_l[0], f"data.neg_{split}_data_paths", seq_length + 1),
            }
            out.append(PreferenceDataset(sides, seq_length, seed + len(out), name=split))
        else:
            text = list(getattr(data, f"{split}_data_paths"))
            labels = list(data.label_data_paths if split == "train" else getattr(data, f"{split}_label_data_paths"))
            rewards = list(getattr(data, f"{split}_reward_data_paths"))
            if not text:
                out.append(None)
                continue
            _one(f"{split}_data_paths", text, rewards, labels)
            side = _Side(text[0], labels[0], f"data.{split}_data_paths", seq_length + 1)
            reward_ds = open_indexed(rewards[0], f"data.{split}_reward_data_paths")
            values = np.asarray([reward_ds[i][0] for i in range(len(reward_ds.sizes))])
            out.append(PreferenceDataset({"completion": side}, seq_length, seed + len(out), values, split))
    return tuple(out)


def data_labels(data, split: str, kind: str) -> list:
    return list(getattr(data, f"{kind}_{split}_label_data_paths"))


def _one(key: str, *lists) -> None:
    if any(len(x) != 1 for x in lists):
        raise ConfigError(
            f"data.{key}: preference training takes one prefix per split with its label (and pos/neg or "
            f"reward) datasets; got {[len(x) for x in lists]} paths"
        )


class PromptDataset:
    """Prompts for online training (train_impl reinforce): one document of a text dataset per sample, in the
    same seeded per-epoch order as PreferenceDataset; ``prompts(indices)`` gives their token lists."""

    def __init__(self, prefix: str, key: str, seed: int):
        self.indexed = open_indexed(prefix, key)
        self.n = len(self.indexed.sizes)
        if self.n == 0:
            raise DataError(f"{key}: {prefix} has no prompts")
        self.order = EpochOrder(self.n, seed)

    def __len__(self) -> int:
        return self.n

    def prompts(self, indices) -> list[list[int]]:
        return [self.indexed[self.order.document(int(i))].tolist() for i in indices]


def build_prompt_datasets(data, seed: int) -> tuple:
    """(train, valid, test) prompt datasets from {split}_data_paths (one prefix each); None where unset."""
    out = []
    for i, split in enumerate(("train", "valid", "test")):
        paths = list(getattr(data, f"{split}_data_paths"))
        if not paths:
            out.append(None)
            continue
        _one(f"{split}_data_paths", paths)
        out.append(PromptDataset(paths[0], f"data.{split}_data_paths", seed + i))
    return tuple(out)
