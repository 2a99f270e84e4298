"""`python -m neox.bench.child SPEC_JSON`: one measurement in a process of its own; prints its result as JSON.

The last stdout line is `NEOX_BENCH_RESULT {...}`; anything a library prints before it is ignored.
"""

from __future__ import annotations

import json
import sys

import torch

from neox.bench.generate import DTYPES, generate_case
from neox.bench.machine import gpu_info
from neox.bench.moe import moe_train_case
from neox.bench.preprocess import prepare, preprocess_case
from neox.bench.startup import startup_case
from neox.bench.train import train_case
from neox.train.metrics import matmul_rate

MARK = "NEOX_BENCH_RESULT "


def machine(dtypes: list[str]) -> dict:
    """The GPUs and, per dtype, the matmul rate now (the peak MFU is taken against is the best of the run)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"gpus": gpu_info(), "device": device, "matmul_flops": {d: matmul_rate(device, DTYPES[d]) for d in dtypes}}


def run_spec(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    kind, a = spec["kind"], spec["args"]
    if kind == "machine":
        return machine(**a)
    if kind == "train":
        return train_case(**a)
    if kind == "moe_train":
        return moe_train_case(**a)
    if kind == "generate":
        return {str(b): generate_case(batch=b, **a) for b in spec["batches"]}
    if kind == "preprocess_prepare":
        return prepare(**a)
    if kind == "preprocess":
        return preprocess_case(**a)
    if kind == "startup":
        return startup_case(**a)
    raise ValueError(f"neox.bench.child: unknown kind {kind!r}")


def main(argv: list[str]) -> int:
    print(MARK + json.dumps(run_spec(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
