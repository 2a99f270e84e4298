"""A tiny corpus (preprocessed with the data package) and tiny training configs for the trainer tests."""

from __future__ import annotations

import random
from pathlib import Path

from neox.config import from_dict
from neox.config.schema import TokenizerConfig
from neox.data.preprocess import PreprocessOptions, preprocess

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "every",
    "juggling",
    "king",
    "and",
    "queen",
    "of",
    "the",
    "small",
    "green",
    "valley",
]


def make_corpus(directory: Path, docs: int = 400, seed: int = 0) -> str:
    """Write random-sentence documents as JSONL and preprocess them byte-level; returns the data prefix."""
    import json

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / "corpus.jsonl"
    with open(src, "w") as f:
        for _ in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "."
            f.write(json.dumps({"text": text}) + "\n")
    prefix = str(directory / "tiny")
    preprocess(
        PreprocessOptions(inputs=[str(src)], output_prefix=prefix, append_eod=True, progress=False),
        TokenizerConfig(tokenizer_type="ByteLevelTokenizer"),
    )
    return prefix + "_text_document"


def tiny_config(data_prefix: str, run_dir: Path | None = None, **groups):
    """A 2-layer, 32-wide model on 32-token sequences; `groups` update the nested config groups."""
    d = {
        "model": {
            "num_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "seq_length": 32,
            "make_vocab_size_divisible_by": 64,
        },
        "tokenizer": {"tokenizer_type": "ByteLevelTokenizer"},
        "data": {"data_path": data_prefix, "split": "90,5,5"},
        "train": {"train_iters": 20, "train_micro_batch_size_per_gpu": 2, "seed": 7, "device": "cpu"},
        "optimizer": {"type": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"lr_decay_style": "cosine", "warmup_iters": 3},
        "eval": {"eval_interval": 10, "eval_iters": 2},
        "logging": {"log_interval": 5, "progress_bar": False},
        "checkpoint": {"save": str(run_dir) if run_dir else None},
    }
    for group, values in groups.items():
        d.setdefault(group, {}).update(values)
    return from_dict(d, source="<test>")
