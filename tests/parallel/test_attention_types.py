"""Every attention type (GPT-NeoX's attention_config) trains a tiny model in one process, and gives the same
5 clipped AdamW steps under tensor parallelism (heads split over ranks, per-head layouts included) and
pipeline parallelism with different types on each stage, to 1e-5 against one process."""

from __future__ import annotations

import functools

import pytest
import torch

from neox.config.schema import ModelConfig
from neox.model import GPT
from tests.parallel import test_parity, test_pipeline
from tests.parallel.parity_worker import BASE_MODEL, SEQ

# 16 tokens in blocks of 2: 8 blocks, so every layout leaves blocks out. One sparsity_config serves all
# types (each reads its own keys); per-head layouts make tensor parallelism slice the layouts' heads.
SPARSITY = {
    "block": 2,
    "different_layout_per_head": True,
    "num_local_blocks": 4,
    "num_global_blocks": 1,
    "num_different_global_patterns": 2,
    "num_random_blocks": 1,
    "local_window_blocks": [1, 3],
    "global_block_indices": [0, 5],
    "global_block_end_indices": [1, 7],
    "num_sliding_window_blocks": 3,
}
TYPES = ["local", "sparse_fixed", "sparse_variable", "bigbird", "bslongformer"]


def model(types: list[str], **extra) -> dict:
    return {"attention_types": types, "sparsity_config": SPARSITY, **extra}


@functools.cache
def global_logits() -> torch.Tensor:
    return train({}, steps=1)[0]


def train(over: dict, steps: int = 5) -> tuple[torch.Tensor, list[float]]:
    """One process: first logits and losses of AdamW steps on one fixed batch (a model that trains fits it)."""
    torch.manual_seed(1234)
    gpt = GPT(ModelConfig(**{**BASE_MODEL, **over}))
    data = torch.randint(0, BASE_MODEL["vocab_size"], (4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-2)
    first, losses = None, []
    for _ in range(steps):
        logits = gpt(data[:, :-1])
        first = logits.detach() if first is None else first
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return first, losses


@pytest.mark.parametrize("kind", TYPES + ["sliding_window"])
def test_each_attention_type_trains_in_one_process(kind):
    over = model(["global", "global"], sliding_window_width=3) if kind == "sliding_window" else model([kind, kind])
    first, losses = train(over)
    assert losses[-1] < losses[0] - 1.0  # it learns the batch
    plain = global_logits()
    # its mask is the one used: same weights, other logits than global attention's, but not for the first
    # two tokens, which every type lets see all of their (causal) past
    assert (first - plain).abs().amax() > 1e-3
    torch.testing.assert_close(first[:, :2], plain[:, :2], rtol=0, atol=1e-5)


TP2 = [
    {
        "name": "tp2 sp local + sparse_fixed",
        "parallel": {"model_parallel_size": 2, "sequence_parallel": True},
        "model": model(TYPES[:2]),
    },
    {
        "name": "tp2 variable + bigbird + bslongformer, window",
        "parallel": {"model_parallel_size": 2},
        "model": model(TYPES[2:], num_layers=3, sliding_window_width=5),
    },
]
PP2 = [
    # stage 0: sparse_variable, global; stage 1: bslongformer, local; packed documents masked on both stages
    {
        "name": "pp2 1f1b variable, global | bslongformer, local, documents",
        "parallel": {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"},
        "model": model(["sparse_variable", "global", "bslongformer", "local"]),
        "docs": True,
    },
]


@pytest.mark.slow
def test_attention_types_under_tensor_parallelism(tmp_path):
    test_parity._check(TP2, 2, tmp_path)


@pytest.mark.slow
def test_attention_types_differing_per_pipeline_stage(tmp_path):
    test_pipeline._check(PP2, 2, tmp_path)
