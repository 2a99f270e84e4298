"""Run by test_tensor_parallel.py under torchrun (2 processes, gloo): `tp_worker.py OUT RUN PROMPTS TASKS`.

On a tensor-parallel model loaded from the one-process checkpoint RUN it records the KV cache's shape, the
tokens each rank sampled from generators seeded apart, and the refusal of a compiled decode; it saves two more
checkpoints of changed weights, one from the tensor-parallel model (tp2) and one from an FSDP-sharded copy
(ZeRO-3), and runs `neox generate` on both and `neox eval` on RUN in this job (rank 0 writes OUT/...)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from neox.cli import main
from neox.config import to_dict
from neox.errors import NeoxError
from neox.infer.api import build_model, build_model_for, checkpoint_config
from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from neox.infer.tensor_parallel import init_inference, is_dtensor
from neox.model.cache import KVCache
from neox.train.checkpoint import resolve, save


def _save(run_dir: Path, model, cfg, **parallel) -> None:
    cfg = copy.deepcopy(cfg)
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    save(run_dir, 1, model, torch.optim.AdamW(model.parameters()), {"iteration": 1}, to_dict(cfg))


def _scale_(model, factor: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if is_dtensor(p) else p).mul_(factor)  # shard-local: no collective, same result


def _generate(run_dir: Path, prompts: Path, out: Path) -> None:
    argv = ["generate", str(run_dir), "--input-file", str(prompts), "--output-file", str(out)]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu"]) == 0


def run(out: Path, run_dir: Path, prompts: Path, tasks: Path) -> None:
    ckpt = resolve(run_dir)
    cfg = checkpoint_config(ckpt)
    mesh = init_inference(cfg, torch.device("cpu"), "tp_worker")
    rank = dist.get_rank()
    model = build_model_for(cfg, ckpt, "cpu", None, mesh)
    record = {"cache_shape": list(KVCache.for_model(model, batch_size=1, max_len=8).k[0].shape)}

    # generators seeded apart still give every rank rank 0's tokens
    gen = torch.Generator().manual_seed(100 + rank)
    res = generate(model, [[5, 6, 7], [9]], 6, SamplingParams(temperature=1.0), generator=gen)
    sampled = [None] * dist.get_world_size()
    dist.all_gather_object(sampled, res.tokens)
    record["sampled"] = sampled
    try:
        generate(model, [[5, 6]], 2, compile=True)
    except NeoxError as e:
        record["compile_error"] = str(e)

    _scale_(model, 1.5)
    _save(out / "tp2", model, cfg, model_parallel_size=2)
    whole = build_model(cfg, ckpt)
    _scale_(whole, 0.75)
    fully_shard(whole, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    _save(out / "zero3", whole, cfg, zero_stage=3)

    _generate(out / "tp2", prompts, out / "gen_tp2.jsonl")
    _generate(out / "zero3", prompts, out / "gen_zero3.jsonl")
    eval_argv = ["eval", str(run_dir), "--tasks", "tiny_ll,tiny_gen", "--include-path", str(tasks)]
    assert main([*eval_argv, "--log-samples", "--output", str(out / "eval"), "--device", "cpu"]) == 0
    if rank == 0:
        (out / "worker.json").write_text(json.dumps(record))


if __name__ == "__main__":
    run(*map(Path, sys.argv[1:5]))
