"""Logits processors and the next-token choice (greedy or sampled).

Processors act on a [B, V] float tensor in the order transformers uses (repetition penalty, temperature,
top-k, top-p) so that the same settings mean the same thing in both tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neox.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 (or 1) = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"generation.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"generation.top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"generation.top_p={self.top_p}: must be in [0, 1] (0 = off)")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"generation.repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the row: positive logits are divided, negative multiplied.

    `seen` is a [B, V] bool mask of tokens present in the prompt or the output so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # mass strictly before each token: a token is kept while the mass above it has not yet reached p
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All processors in transformers' order; returns float32 logits ready for argmax / softmax."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


def choose_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row, [B] int64: argmax when greedy, otherwise a draw from the processed distribution."""
    logits = process_logits(logits, params, seen)
    if params.greedy:
        # max's indices are argmax's (the first maximum, documented) at ~2.5x its speed on a CPU: [8, 50304]
        # fp32 128 vs 324 us (2-core Xeon, 2 threads), ~2% of a pythia-70m batch-8 decode step
        return logits.max(dim=-1).indices
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
