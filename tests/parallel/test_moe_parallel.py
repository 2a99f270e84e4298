"""MoE layers under the existing layouts (experts sharded by ZeRO like every weight, replicated over tensor-
parallel ranks): 5 clipped AdamW steps match one process to 1e-5 (fp32), aux and z losses included."""

from __future__ import annotations

import pytest

from tests.parallel.test_parity import _check

MOE = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk", "moe_aux_loss_coeff": 0.1}
TWO = [
    {
        "name": "moe dp2 (DDP) sinkhorn top-1, token dropping",
        "parallel": {},
        "model": {
            **MOE,
            "moe_router_type": "sinkhorn",
            "moe_top_k": 1,
            "moe_token_dropping": True,
            "moe_min_capacity": 1,
        },
    },
    {
        "name": "moe zero3 dp2 swiglu + shared expert + z-loss",
        "parallel": {"zero_stage": 3},
        "model": {**MOE, "activation": "swiglu", "moe_num_shared_experts": 1, "moe_z_loss_coeff": 0.01},
    },
    {"name": "moe tp2", "parallel": {"model_parallel_size": 2}, "model": {**MOE, "moe_expert_interval": 2}},
]


@pytest.mark.slow
def test_moe_parity_two_processes(tmp_path):
    _check(TWO, 2, tmp_path)


PIPELINE = [
    # four blocks, MoE in blocks 0 and 2: both stages hold one, so the first stage's aux loss trains its
    # router through the backward-only attachment, with no loss on that stage
    {
        "name": "moe pp2 1f1b",
        "parallel": {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"},
        "model": {**MOE, "moe_expert_interval": 2, "moe_z_loss_coeff": 0.01},
    },
]


@pytest.mark.slow
def test_moe_pipeline_parity_pp2(tmp_path):
    from tests.parallel.test_pipeline import _check as check_pipeline

    check_pipeline(PIPELINE, 2, tmp_path)
