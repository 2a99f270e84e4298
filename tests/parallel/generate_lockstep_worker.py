"""Sampling from a model sharded over two data-parallel ranks (FSDP2, as ZeRO-3 trains it), each rank on its
own prompt, rank 0's stopping at its first token while rank 1's runs to the end: each rank's tokens, finish
reasons and random stream afterwards against the same sampling by the whole model, alone (no lockstep). Rank 0
writes {"rank0": ..., "rank1": ...}; every rank also checks that a second call after the first runs.

Usage (torchrun, 2 processes): generate_lockstep_worker.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.parallel.dist_helpers

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from neox.model import GPT
from tests.parallel.dist_helpers import strict_collectives
from tests.train.tiny_run import tiny_config

NEW = 6
PARAMS = SamplingParams(temperature=1.0)


def sample(model, prompt, eod, seed):
    torch.manual_seed(seed)
    out = generate(model, [prompt], NEW, PARAMS, eod_id=eod)
    return {"tokens": out.tokens[0], "reason": out.finish_reasons[0], "after": torch.rand(2).tolist()}


def main(out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    strict_collectives()
    rank = dist.get_rank()
    torch.manual_seed(0)
    plain = GPT(tiny_config("unused", model={"vocab_size": 320}).model).eval()
    sharded = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    for block in sharded.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    prompt, seed = [[72, 105, 33], [11, 22, 33, 44]][rank], 100 + rank
    free = sample(plain, prompt, None, seed)["tokens"]  # this rank's draws without a stop
    # rank 0 stops at its first token; rank 1 at a token it never draws (it runs all NEW steps)
    eod = free[0] if rank == 0 else next(t for t in range(256) if t not in free)
    alone = sample(plain, prompt, eod, seed)
    together = sample(sharded, prompt, eod, seed)
    again = sample(sharded, prompt, eod, seed)  # the wrappers are fit for another call (and training)
    results = [None, None]
    dist.all_gather_object(results, {"alone": alone, "sharded": together, "again": again})
    if rank == 0:
        Path(out_file).write_text(json.dumps({"rank0": results[0], "rank1": results[1]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
