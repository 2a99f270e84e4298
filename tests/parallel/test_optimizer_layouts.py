"""Every optimizer under ZeRO-3 (dp2) and tensor parallelism (tp2) matches one process: 5 clipped steps of the
parity model (tests/parallel/parity_worker.py), optimizer state sharded as the parameters are."""

from __future__ import annotations

import pytest

from tests.parallel.dist_helpers import run_cases
from tests.parallel.parity_worker import COLLECTIVES_KEY, run_case

OPTIMIZERS = {
    "lion": {"type": "lion", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
    "sm3": {"type": "sm3", "lr": 0.05, "momentum": 0.5, "beta": 0.9},
    "madgrad_wd": {"type": "madgrad_wd", "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.01},
    "adafactor": {"type": "adafactor", "lr": 1.0},
    "muon": {"type": "muon", "lr": 1e-2, "weight_decay": 0.01},
}
LAYOUTS = {"zero3 dp2": {"zero_stage": 3}, "tp2": {"model_parallel_size": 2}}
CASES = [
    {"name": f"{kind} {layout}", "parallel": parallel, "optimizer": opt}
    for kind, opt in OPTIMIZERS.items()
    for layout, parallel in LAYOUTS.items()
]
# Muon's Newton-Schulz iterations run in bf16 (torch.optim.Muon), on matrices that DTensor multiplies shard
# by shard under tensor parallelism: a different rounding order, so a looser match than the elementwise ones.
TOLERANCE = {"muon": 2e-3}


@pytest.mark.slow
def test_each_optimizer_matches_one_process_under_zero3_and_tp2(tmp_path):
    got = run_cases("parity_worker.py", 2, CASES, tmp_path)
    got.pop(COLLECTIVES_KEY)
    for case in CASES:
        kind = case["optimizer"]["type"]
        dp = 1 if "model_parallel_size" in case["parallel"] else 2
        ref = run_case({"optimizer": case["optimizer"]}, micro_batches=dp)
        assert len(set(ref)) == len(ref), f"{kind}: the reference did not train"
        assert got[case["name"]] == pytest.approx(ref, abs=TOLERANCE.get(kind, 1e-5)), case["name"]
