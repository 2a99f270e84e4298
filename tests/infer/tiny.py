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


def greedy_reference(
    model, prompt: list[int], new_tokens: int, eod_id: int | None = None, repetition_penalty: float = 1.0
) -> list[int]:
    """The greedy continuation of one prompt the plain way, as an independent check on `generate`: the model's
    full forward over the whole sequence each step (no cache, no padding, no batching), the argmax of the last
    position's logits appended one at a time. Stops before `eod_id`. A repetition penalty divides positive
    logits of tokens already in the sequence and multiplies negative ones (the CTRL formula)."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids]))[0, -1].float()
            if repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(ids)))
                logits[seen] = torch.where(
                    logits[seen] > 0, logits[seen] / repetition_penalty, logits[seen] * repetition_penalty
                )
            nxt = int(logits.argmax())
            if nxt == eod_id:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def greedy_shortfall(model, prompt: list[int], output: list[int], new_tokens: int, eod_id: int | None = None):
    """How far `output` strays from the greedy continuation, by the model's full forward on the prompt and the
    output so far: the largest gap between the best logit and the chosen token's, relative to the best logit's
    magnitude (0 when exactly greedy). Rounding may flip a near-tie, which shows as a gap of an ulp or two
    (2**-8 apiece in bf16); a wrong token shows as more.
    An output shorter than `new_tokens` must have stopped at `eod_id`, which is then checked as well."""
    chosen = list(output) + ([eod_id] if len(output) < new_tokens else [])
    worst = 0.0
    with torch.no_grad():
        for t, token in enumerate(chosen):
            logits = model(torch.tensor([list(prompt) + list(output[:t])]))[0, -1].float()
            best = logits.max()
            worst = max(worst, float((best - logits[token]) / best.abs()))
    return worst


def make_run(run_dir: Path, cfg, model: GPT | None = None, iteration: int = 1) -> Path:
    """Save `model` (random when None) as checkpoint `iteration` of run directory `run_dir`."""
    model = model if model is not None else random_model(cfg)
    save(run_dir, iteration, model, torch.optim.AdamW(model.parameters()), {"iteration": iteration}, to_dict(cfg))
    return run_dir
