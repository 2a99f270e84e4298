"""MoE layers under every layout (experts sharded by ZeRO like every weight, replicated over tensor-parallel
ranks, or split over data-parallel ranks by expert parallelism, alone or with ep below the data-parallel
size, tensor or pipeline parallelism): 5 clipped steps match one process to 1e-5 (fp32), aux and z losses
included; a checkpoint saved at ep2 x dp2 resumes in one process (ep1) exactly; the routing statistics at
log lines are those of the whole batch, as one process counts them."""

from __future__ import annotations

import json

import pytest

from tests.parallel.dist_helpers import run_cases
from tests.parallel.parity_worker import COLLECTIVES_KEY, run_case
from tests.parallel.test_parity import TOLERANCE, _check

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


# four processes, experts on 2 of the 4 data-parallel ranks each (ep2 x replicas 2), or ep2 beside tp2
FOUR = [
    {
        "name": "ep2 x zero3 dp2 swiglu + z-loss",
        "parallel": {"expert_parallel_size": 2, "zero_stage": 3},
        "model": {**MOE, "activation": "swiglu", "moe_z_loss_coeff": 0.01},
    },
    # plain SGD (no Adam normalisation) on the clipped gradient: the expert gradients' scale against the dense
    # ones decides the step, so a wrong replica average or 1/dp shows; DDP for the dense weights
    {
        "name": "ep2 x dp2 (DDP) sgd",
        "parallel": {"expert_parallel_size": 2},
        "model": MOE,
        "optimizer": {"type": "sgd", "lr": 1.0},
    },
    {
        "name": "ep2 x hsdp 2x2",
        "parallel": {"expert_parallel_size": 2, "zero_stage": 3, "dp_replicate": 2},
        "model": MOE,
    },
    {
        "name": "ep2 x tp2 zero1 sgd",
        "parallel": {"expert_parallel_size": 2, "model_parallel_size": 2, "zero_stage": 1},
        "model": MOE,
        "optimizer": {"type": "sgd", "lr": 1.0},
    },
]


@pytest.mark.slow
def test_expert_parallel_parity_four_processes(tmp_path):
    got = run_cases("parity_worker.py", 4, FOUR, tmp_path)
    checked = got.pop(COLLECTIVES_KEY)
    assert checked.get("dist.all_to_all_single cpu via gloo", 0) > 0, checked  # tokens really travelled
    refs = {}
    for case in FOUR:
        dp = 4 // case["parallel"].get("model_parallel_size", 1)
        ref_case = {k: case[k] for k in ("model", "optimizer") if k in case}
        key = json.dumps([ref_case, dp], sort_keys=True)
        if key not in refs:
            refs[key] = run_case(ref_case, micro_batches=dp)
            assert len(set(refs[key])) == len(refs[key])  # the reference really trains
        assert got[case["name"]] == pytest.approx(refs[key], abs=TOLERANCE["fp32"]), case["name"]


def _records(run_dir) -> dict:
    from neox.train.metrics import METRICS_FILE

    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "moe/aux_loss" in r}


def _same_routing(got: dict, want: dict, where: str) -> None:
    assert got["moe/tokens_per_expert"] == want["moe/tokens_per_expert"], where
    for key in ("moe/aux_loss", "moe/z_loss", "moe/router_entropy", "moe/max_load", "moe/dropped_frac"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), (where, key)


@pytest.mark.slow
def test_ep2_dp2_checkpoint_resumes_at_ep1_and_pp2_ep2_trains(tmp_path):
    """The real Trainer on 4 processes: ep2 x ZeRO-3 dp2 (activation checkpointing) matches one process and
    saves; pp2 x ep2 (1F1B, MoE layers on both stages) matches the whole run. One process (ep1) loads the
    ep2 x dp2 checkpoint's weights exactly and continues with the uninterrupted losses. Both layouts log the
    routing statistics of the whole global batch (every rank, every stage), as the one process does."""
    from tests.parallel.test_reshard import ITERS, STOP, groups, launch, run_here
    from tests.train.tiny_run import make_corpus

    corpus = make_corpus(tmp_path / "corpus", docs=200)
    model = {**MOE, "vocab_size": 384, "num_layers": 4, "moe_expert_interval": 2, "moe_z_loss_coeff": 0.01}
    log = {"log_interval": STOP}
    straight = run_here(corpus, model=model, logging={**log, "log_dir": str(tmp_path / "straight")})
    want = _records(tmp_path / "straight")
    # 4 sequences of 32 tokens a step, 2 assignments each, 2 MoE layers: what the counts must add up to
    assert sum(want[STOP]["moe/tokens_per_expert"]) == STOP * 4 * 32 * 2 * 2
    save = str(tmp_path / "run")
    runs = [
        {
            "name": "ep2 x dp2",
            "stop_at": STOP,
            "groups": groups(
                model=model,
                parallel={"expert_parallel_size": 2, "zero_stage": 3},
                checkpoint={"save": save, "save_interval": STOP},
                logging=log,
                # recomputed MoE forwards exchange tokens again inside the backward (and count no statistics)
                train={"checkpoint_activations": True},
            ),
        },
        {
            "name": "pp2 x ep2",
            "groups": groups(
                model=model,
                parallel={"expert_parallel_size": 2, "pipe_parallel_size": 2, "pipe_schedule": "1f1b"},
                logging={**log, "log_dir": str(tmp_path / "pp")},
            ),
        },
    ]
    got = launch(4, corpus, runs, tmp_path, "save")
    assert got["ep2 x dp2"] == pytest.approx(straight[:STOP], abs=1e-5)
    assert got["pp2 x ep2"] == pytest.approx(straight, abs=1e-5)
    _same_routing(_records(tmp_path / "run")[STOP], want[STOP], "ep2 x dp2")
    pp = _records(tmp_path / "pp")
    for it in (STOP, ITERS):
        _same_routing(pp[it], want[it], f"pp2 x ep2 iteration {it}")

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
