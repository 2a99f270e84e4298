"""neox.bench.moe's measurement (what bench/moe.py runs in each child) at a toy shape, in this process: every
engine trains and reports, and the dense model has the MoE model's active FLOPs per token."""

from __future__ import annotations

import pytest

from neox.bench.moe import ENGINES, moe_config, moe_train_case
from neox.model import flops_per_token

TOY = dict(layers=1, hidden=32, heads=2, experts=4, top_k=2, expert_width=48, vocab=384, seq=16, micro=2)


def test_dense_has_the_moe_models_active_flops_less_the_router():
    moe, dense = moe_config(True, "fp32", **TOY).model, moe_config(False, "fp32", **TOY).model
    assert dense.intermediate_size == TOY["top_k"] * moe.intermediate_size
    router = 6 * TOY["layers"] * TOY["hidden"] * TOY["experts"]  # 6 FLOPs per weight per token, trained
    assert flops_per_token(moe) - flops_per_token(dense) == router


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_trains_and_reports(engine):
    pytest.importorskip("transformers")
    r = moe_train_case(engine, "fp32", steps=1, warmup=0, **TOY)
    assert r["tokens_per_s"] > 0 and len(r["step_times_s"]) == 1
    assert r["tokens_per_s"] == pytest.approx(TOY["micro"] * TOY["seq"] / r["step_times_s"][0])
    if engine == "hf-mixtral":
        assert r["hf_experts_implementation"] in ("grouped_mm", "eager", "batched_mm")  # transformers' default
    if engine == "hf-mixtral-eager":
        assert r["hf_experts_implementation"] == "eager"
