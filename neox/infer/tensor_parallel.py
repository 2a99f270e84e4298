"""Inference over several processes: `neox generate` / `neox eval --nproc N` shard one model over N
tensor-parallel ranks (neox.parallel.tensor's plan), so a model too big for one device can still be sampled
and scored.

Every rank runs the same program on the same inputs; the collectives inside the forward keep them in step.
- Layout: all N processes are one tensor-parallel group; the checkpoint's training layout (pipeline stages,
  ZeRO shards, its own tensor-parallel size) does not matter, since DCP reads each rank's slices from any
  saved layout. Pipeline stages at inference are refused.
- Weights: the model is sharded first, then each rank reads only its slices of the checkpoint.
- KV cache: each rank holds the keys/values of its own heads (the GPT's num_kv_heads is set to the local count).
- Logits come out vocab-sharded; `full_logits` gathers them, so sampling sees the whole vocabulary on every rank.
- A training model sampled by neox.train.reinforce may also be sharded over data-parallel ranks (FSDP2), each
  continuing its own prompts: those ranks go on until all of them have stopped (`lockstep_group`).
- Sampling: the seed is agreed from rank 0 and, so that ranks can never diverge (a near-tie rounded differently,
  a generator seeded apart), every step's chosen tokens are broadcast from rank 0; stop conditions are then
  computed from identical tokens everywhere. Only rank 0 prints or writes (`is_output_rank`).
"""

from __future__ import annotations

import copy
import random
import sys

import torch
import torch.distributed as dist

from neox.errors import ConfigError
from neox.parallel.comm import all_reduce_, broadcast_
from neox.parallel.mesh import ParallelDims, init_distributed, world_from_env
from neox.parallel.tensor import apply_tensor_parallel

LAYOUT_KEYS = ("pipe_parallel_size", "model_parallel_size")


def world_size() -> int:
    """Processes in this job (torchrun's WORLD_SIZE; 1 outside torchrun)."""
    return world_from_env()[2]


def is_output_rank() -> bool:
    """Whether this process prints and writes results: rank 0, or the only process."""
    return world_from_env()[0] == 0


def inference_parallel(pcfg, world: int):
    """The parallel settings inference runs with: one tensor-parallel group over all `world` processes."""
    p = copy.copy(pcfg)
    p.pipe_parallel_size, p.model_parallel_size, p.dp_replicate = 1, world, 1
    p.zero_stage, p.sequence_parallel, p.cpu_offload = 0, False, False
    if hasattr(p, "expert_parallel_size"):
        p.expert_parallel_size = 1  # experts stay whole on every rank (the tensor-parallel plan's MoE rule)
    return p


def check_inference_layout(cfg, world: int, source: str, saved=None) -> None:
    """One-line errors for a layout inference cannot run, before any process starts.

    `saved` is the checkpoint's own config: a pipeline or tensor-parallel size that differs from it was asked
    for by the user (--config / --set), and only `model_parallel_size == world` can be honoured."""
    if world < 1:
        raise ConfigError(f"{source}: --nproc must be 1 or more, got {world}")
    if saved is not None:
        for key in LAYOUT_KEYS:
            asked, was = getattr(cfg.parallel, key), getattr(saved.parallel, key)
            if asked == was:
                continue
            if key == "pipe_parallel_size" and asked > 1:
                raise ConfigError(
                    f"{source}: parallel.pipe_parallel_size={asked}: pipeline stages are not supported at "
                    f"inference; --nproc N shards every layer over N tensor-parallel ranks instead (drop the setting)"
                )
            if key == "model_parallel_size" and asked != world:
                raise ConfigError(
                    f"{source}: parallel.model_parallel_size={asked} but {world} process(es) run: inference "
                    f"is tensor parallel over all of them; use --nproc {asked} or drop the setting"
                )
    if world == 1:
        return
    vocab = cfg.model.vocab_size
    if vocab is not None and vocab % world:
        raise ConfigError(
            f"{source}: the model's vocabulary ({vocab} rows) cannot be split over {world} tensor-parallel "
            f"ranks; use an --nproc that divides {vocab}"
        )
    ParallelDims.from_config(inference_parallel(cfg.parallel, world), world, cfg.model, source)


def init_inference(cfg, device, source: str):
    """Under torchrun: create the process group and a mesh whose "tp" dim holds every rank. None for one
    process (no torch.distributed at all)."""
    world = world_size()
    check_inference_layout(cfg, world, source)
    if world == 1:
        return None
    _, mesh = init_distributed(inference_parallel(cfg.parallel, world), cfg.model, device, source)
    return mesh


def shard_model(model, mesh, device):
    """Shard a freshly built GPT over mesh["tp"] and put what stays whole (norms, position tables) on
    `device`; the weights are loaded afterwards, each rank reading its own slices."""
    tp = mesh["tp"]
    apply_tensor_parallel(model, tp, sequence_parallel=False)  # the kv head count: this rank's (cache sizes)
    return model.to(device)


def is_dtensor(x) -> bool:
    """Whether `x` is a DTensor, without importing torch.distributed.tensor (slow to import; one-process
    generation never needs it, and no DTensor can exist before it is imported)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _sharded_dims(model):
    """(mesh, dim names) of the mesh `model`'s attention weights are DTensors on, or (None, ())."""
    layers = getattr(model, "layers", None)
    if not layers:
        return None, ()
    w = next(iter(layers.values())).attention.query_key_value.weight
    if not is_dtensor(w):
        return None, ()
    return w.device_mesh, w.device_mesh.mesh_dim_names or ("tp",)


def tp_group(model):
    """The process group `model` is tensor-parallel over, or None for a whole (one-process) model."""
    mesh, names = _sharded_dims(model)
    return mesh.get_group("tp") if "tp" in names else None


def lockstep_group(model):
    """The data-parallel group `model`'s weights are sharded over (ZeRO, FSDP2: a training model sampled by
    neox.train.reinforce), or None. Each forward gathers the weights over it, so its ranks, which continue
    different prompts, must run the same number of steps."""
    mesh, names = _sharded_dims(model)
    data = [n for n in names if n != "tp"]
    if not data:
        return None
    return mesh.get_group("dp_shard" if "dp_shard" in data else data[0])


def all_stopped_on(group, stopped: bool, device) -> bool:
    """Whether every rank of `group` has stopped (one all-reduce); `stopped` itself without a group."""
    if group is None:
        return stopped
    flag = torch.tensor([0 if stopped else 1], dtype=torch.int32, device=device)
    return not bool(all_reduce_(flag, group, dist.ReduceOp.MAX))


def on_local(x, fn):
    """`fn(x)` for a plain tensor; for a replicated DTensor (the tied head's input) `fn` of its local tensor,
    wrapped back with the same placements (DTensor refuses some indexing, such as by plain index tensors)."""
    if not is_dtensor(x):
        return fn(x)
    return type(x).from_local(fn(x.to_local()), x.device_mesh, x.placements, run_check=False)


def full_logits(logits):
    """Vocab-sharded logits (a DTensor) gathered into a plain tensor; plain logits as they are."""
    return logits.full_tensor() if is_dtensor(logits) else logits


class TokenSync:
    """Makes every rank continue with rank 0's tokens (a no-op for a whole model)."""

    def __init__(self, model):
        self.group = tp_group(model)
        self.src = dist.get_global_rank(self.group, 0) if self.group is not None else 0

    @property
    def active(self) -> bool:
        return self.group is not None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return tokens
        return broadcast_(tokens.contiguous(), self.src, self.group)


def shared_seed(seed: int | None) -> int | None:
    """Under torch.distributed: the seed every rank samples with, rank 0's (drawn there when None)."""
    if not dist.is_initialized():
        return seed
    pick = torch.tensor([seed if seed is not None else random.SystemRandom().randrange(2**62)], dtype=torch.long)
    broadcast_(pick, 0, None)
    return int(pick)
