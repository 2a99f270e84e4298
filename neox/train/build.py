"""The model for a layout, built without a full copy per rank.

The GPT is built on the meta device (shapes only), wrapped for the layout by `neox.parallel.parallelize`
(tensor-parallel DTensors, FSDP2 shards, this rank's pipeline stages), and only then given memory
(`to_empty`) and initial values: each rank allocates and draws its own shard. The values come from
`neox.model.init.seeded_rows`, a function of (train.seed, parameter name, shape) drawn in fixed row blocks,
so every layout (and one process) starts from the same weights, and a shard costs one row block of
temporary memory beyond itself. A checkpoint to resume then loads through DCP into those shards.

Data-parallel replication (ZeRO 0: DDP, or FSDP2's replicate under tp/pp) holds the whole model on every
rank anyway, and DDP's reducer needs real parameters when it is set up: those layouts are materialised before
they are wrapped (same values).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from neox.config.schema import Config, ModelConfig
from neox.model import GPT
from neox.model.init import parameter_rules, seeded_rows
from neox.model.lora import apply_lora
from neox.parallel.compose import parallelize
from neox.parallel.runner import StepRunner


def build_model(
    cfg: Config, layout, precision, device: torch.device, accum: int, loss_fn
) -> tuple[nn.Module, StepRunner]:
    """(model, runner) for this process (see neox.parallel.parallelize), with initialised weights."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    lo = cfg.lora
    if lo.rank:  # adapters before anything wraps the model: they are parameters like the others from here on
        apply_lora(model, lo.rank, lo.alpha, lo.dropout, lo.target_modules)
    model = precision.prepare(model)  # activation checkpointing is applied by parallelize, per pipeline stage
    # FSDP2 keeps offloaded shards on the CPU: they are allocated there
    where = torch.device("cpu") if cfg.parallel.cpu_offload else device
    replicated = layout.dp_size > 1 and cfg.parallel.zero_stage == 0
    if replicated:
        materialize(model, cfg.model, cfg.train.seed, where)
    model, runner = parallelize(
        model, cfg, layout.mesh, precision=precision, device=device, accum=accum, loss_fn=loss_fn
    )
    if not replicated:
        materialize(model, cfg.model, cfg.train.seed, where)
    # with several pipeline stages per rank each stage has top-level modules of its own (rotary, ALiBi and
    # sinusoidal tables: buffers only) that `model`, the rank's combined view, does not reach
    for stage in getattr(runner, "stages", ()):
        materialize_buffers(stage, where)
    return model, runner


@torch.no_grad()
def materialize(model: nn.Module, cfg: ModelConfig, seed: int, device: torch.device) -> None:
    """Allocate `model`'s parameters (meta, plain or DTensor shards) on `device` and give each its part of the
    layout-independent initial value. Attributes set on parameters (the pipeline's tied-copy flag) survive."""
    marks = {name: dict(vars(p)) for name, p in model.named_parameters(remove_duplicate=False)}
    model.to_empty(device=device)
    for name, p in model.named_parameters(remove_duplicate=False):
        for key, value in marks.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)
    for name, p, rule in parameter_rules(model):
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(local_value(p, rule, cfg, name, seed))


def materialize_buffers(module: nn.Module, device: torch.device) -> None:
    """Allocate the modules of `module` that hold meta buffers and no parameters (derived tables rebuild
    themselves on `to_empty`); parameters are `materialize`'s."""
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)) and not any(sub.parameters(recurse=False)):
            sub.to_empty(device=device, recurse=False)


def local_value(p: torch.Tensor, rule: str, cfg: ModelConfig, name: str, seed: int) -> torch.Tensor:
    """This rank's part of parameter `name`'s initial value (fp32, CPU)."""
    shape = tuple(p.shape)  # a DTensor's global shape
    if not isinstance(p, DTensor):
        return seeded_rows(rule, cfg, name, shape, seed)
    if all(type(q) in (Shard, Replicate) for q in p.placements):
        # a box of the full tensor: draw only the row blocks it overlaps, then cut the other dimensions
        size, offset = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
        rows = seeded_rows(rule, cfg, name, shape, seed, offset[0], offset[0] + size[0])
        return rows[(slice(None), *(slice(o, o + n) for o, n in zip(offset[1:], size[1:])))]
    # other placements (FSDP2's strided shard over a tensor-parallel dim): draw the whole parameter and let
    # DTensor cut this rank's part, without communication
    full = seeded_rows(rule, cfg, name, shape, seed)
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
