"""MoE layers under every layout (experts sharded by ZeRO like every weight, replicated over tensor-parallel
ranks, or split over data-parallel ranks by expert parallelism): 5 clipped AdamW steps match one process to
1e-5 (fp32), aux and z losses included; a checkpoint saved at ep2 resumes in one process (ep1) exactly."""

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
    # expert parallelism: two experts per rank, tokens exchanged by all-to-all
    {"name": "ep2 (dense weights replicated)", "parallel": {"expert_parallel_size": 2}, "model": MOE},
    {
        "name": "ep2 x zero3 dp2 swiglu + z-loss",
        "parallel": {"expert_parallel_size": 2, "zero_stage": 3},
        "model": {**MOE, "activation": "swiglu", "moe_z_loss_coeff": 0.01},
    },
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


@pytest.mark.slow
def test_ep2_checkpoint_resumes_at_ep1(tmp_path):
    """The real Trainer at ep2 matches one process, saves; one process (ep1) loads exactly those weights and
    continues with the uninterrupted run's losses."""
    from tests.parallel.test_reshard import STOP, groups, launch, run_here
    from tests.train.tiny_run import make_corpus

    corpus = make_corpus(tmp_path / "corpus", docs=200)
    model = {
        "vocab_size": 384,
        "moe_num_experts": 4,
        "moe_top_k": 2,
        "moe_router_type": "topk",
        "moe_aux_loss_coeff": 0.1,
    }
    straight = run_here(corpus, model=model)
    save = str(tmp_path / "run")
    first = launch(
        2,
        corpus,
        [
            {
                "name": "ep2",
                "stop_at": STOP,
                "groups": groups(
                    model=model,
                    parallel={"expert_parallel_size": 2},
                    checkpoint={"save": save, "save_interval": STOP},
                ),
            }
        ],
        tmp_path,
        "save",
    )["ep2"]
    assert first == pytest.approx(straight[:STOP], abs=1e-5)

    import torch

    from neox.train.checkpoint import consolidate
    from neox.train.distributed import resume_config
    from neox.train.trainer import Trainer
    from tests.train.tiny_run import tiny_config

    torch.set_num_threads(1)
    single = Trainer(resume_config(tiny_config(corpus, **groups(model=model, checkpoint={"load": save}))), quiet=True)
    consolidate(save, tmp_path / "model.pt")
    full = torch.load(tmp_path / "model.pt")["model"]
    assert full.keys() == single.model.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in single.model.state_dict().items())
    single.fit()
    assert single.losses == pytest.approx(straight[STOP:], abs=1e-5)
