"""Tiny random checkpoints for the infer and interop tests, written with the trainer's own checkpoint code."""

from __future__ import annotations

from pathlib import Path

import torch

from neox.config import from_dict, to_dict
from neox.model import GPT
from neox.train.checkpoint import save

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128, vocab_size=384)


def tiny_config(tokenizer: dict | None = None, generation: dict | None = None, **model):
    return from_dict(
        {
            "model": {**TINY, **model},
            "tokenizer": tokenizer or {"tokenizer_type": "ByteLevelTokenizer"},
            "generation": generation or {},
        }
    )


def random_model(cfg, seed: int = 0, scale: float = 0.05) -> GPT:
    """A GPT whose every weight (norms included) is perturbed, so that mapping mistakes change the logits."""
    torch.manual_seed(seed)
    model = GPT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def make_run(run_dir: Path, cfg, model: GPT | None = None, iteration: int = 1) -> Path:
    """Save `model` (random when None) as checkpoint `iteration` of run directory `run_dir`."""
    model = model if model is not None else random_model(cfg)
    save(run_dir, iteration, model, torch.optim.AdamW(model.parameters()), {"iteration": iteration}, to_dict(cfg))
    return run_dir
