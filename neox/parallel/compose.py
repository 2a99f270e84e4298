"""`neox.parallel.parallelize`: a model and its step runner for a layout; `neox.parallel.apply`: tensor
parallelism first (it turns weights into DTensors), data parallelism on top."""

from __future__ import annotations

import functools

import torch
from torch import nn

from neox.errors import ConfigError
from neox.parallel import activation_checkpoint, compress, pipeline
from neox.parallel.expert import apply_expert_parallel
from neox.parallel.fsdp import apply_fsdp, apply_replicate
from neox.parallel.mesh import ParallelDims, expert_mesh
from neox.parallel.reduce import masked_mean_loss
from neox.parallel.runner import LocalRunner, LossFn, StepRunner
from neox.parallel.tensor import apply_tensor_parallel


def apply(
    model: nn.Module,
    pcfg,
    mesh,
    *,
    precision: str = "fp32",
    bf16_mode: str = "autocast",
    fp32_allreduce: bool = False,
    device_type: str = "cpu",
    train=None,
) -> nn.Module:
    """Parallelize `model` (a GPT, or one pipeline stage of it) in place for `mesh`; returns it.

    `train` (a TrainConfig) asks for activation checkpointing, applied first (per stage, so a group of
    checkpoint_num_layers blocks never spans two stages). mesh None (one process) leaves the model as it is
    otherwise. The module keeps its class behaviour and parameter names, so checkpoints (get_state_dict) and
    the trainer treat every layout alike.
    """
    dims = ParallelDims.from_mesh(mesh, pcfg) if mesh is not None else None
    if train is not None:
        activation_checkpoint.apply(model, train, fsdp=dims is not None and dims.dp > 1 and dims.fsdp)
    if mesh is None:
        return model
    compress.validate(pcfg)  # before any wrapping: a layout without DDP cannot take a compression hook
    experts = apply_expert_parallel(model, expert_mesh(mesh)) if dims.ep > 1 else []
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], dims.sp)
    if dims.dp > 1 or (dims.fsdp and pcfg.cpu_offload):  # one process may shard over itself to offload
        if dims.fsdp:
            # zero-bubble schedules run a stage's weight backward after the next forward: resharding
            # in between would compute those gradients from freed parameters, silently wrong
            apply_fsdp(
                model,
                dims,
                mesh,
                precision=precision,
                bf16_mode=bf16_mode,
                fp32_allreduce=fp32_allreduce,
                cpu_offload=pcfg.cpu_offload,
                device_type=device_type,
                reshard_after_forward=False if dims.pp > 1 else None,
                ignored=experts,
            )
        else:
            apply_replicate(
                model,
                dims,
                mesh,
                precision=precision,
                bf16_mode=bf16_mode,
                fp32_allreduce=fp32_allreduce,
                ignored=experts,
            )
            compress.register(model, pcfg, mesh["dp_replicate"].get_group())
    return model


def parallelize(
    model: nn.Module,
    cfg,
    mesh,
    *,
    precision,
    device: torch.device,
    accum: int,
    loss_fn: LossFn = masked_mean_loss,
) -> tuple[nn.Module, StepRunner]:
    """(model, runner) for this process: `model` is what the optimizer, gradient clipping and checkpoints
    see (this rank's pipeline stages under pp > 1, else the wrapped GPT, names unchanged); `runner` runs a
    step's `accum` micro-batches through it. mesh None is one process.

    `precision` is the run's neox.train.precision.Precision (its `autocast()` wraps each forward);
    `loss_fn(logits, labels, loss_mask)` is the loss; under tensor parallelism its logits are vocab-sharded
    DTensors (it runs inside `loss_context`).
    """
    pcfg, data = cfg.parallel, cfg.data
    wrap = functools.partial(
        apply,
        pcfg=pcfg,
        mesh=mesh,
        precision=cfg.precision.precision,
        bf16_mode=cfg.precision.bf16_mode,
        fp32_allreduce=cfg.precision.fp32_allreduce,
        device_type=device.type,
        train=cfg.train,
    )
    if mesh is not None and mesh["pp"].size() > 1:
        if cfg.train.compile:
            raise ConfigError("train.compile is not supported with pipe_parallel_size > 1 yet; turn one of them off")
        return pipeline.build(
            model,
            pcfg,
            mesh,
            n_micro=accum,
            precision=precision,
            device=device,
            parallelize=wrap,
            pass_positions=data.reset_position_ids,
            pass_segments=data.reset_attention_mask,
            loss_fn=loss_fn,
        )
    model = wrap(model)
    runner = LocalRunner(
        torch.compile(model) if cfg.train.compile else model,
        precision,
        device,
        pass_positions=data.reset_position_ids,
        pass_segments=data.reset_attention_mask,
        vocab_parallel=mesh is not None and pcfg.model_parallel_size > 1,
        loss_fn=loss_fn,
    )
    return model, runner
