"""`neox.parallel.apply`: tensor parallelism first (it turns weights into DTensors), data parallelism on top."""

from __future__ import annotations

from torch import nn

from neox.parallel import compress
from neox.parallel.fsdp import apply_fsdp, apply_replicate
from neox.parallel.mesh import ParallelDims
from neox.parallel.tensor import apply_tensor_parallel


def apply(
    model: nn.Module, pcfg, mesh, *, precision: str = "fp32", bf16_mode: str = "autocast", device_type: str = "cpu"
) -> nn.Module:
    """Parallelize `model` (a GPT, or one pipeline stage of it) in place for `mesh`; returns it.

    mesh None (one process) leaves the model as it is. The module keeps its class behaviour and
    parameter names, so checkpoints (get_state_dict) and the trainer treat every layout alike.
    """
    if mesh is None:
        return model
    compress.validate(pcfg)  # before any wrapping: a layout without DDP cannot take a compression hook
    dims = ParallelDims.from_mesh(mesh, pcfg)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], dims.sp)
    if dims.dp > 1:
        if dims.fsdp:
            # pipeline stages keep parameters gathered between forward and backward (trap A)
            apply_fsdp(
                model,
                dims,
                mesh,
                precision=precision,
                bf16_mode=bf16_mode,
                cpu_offload=pcfg.cpu_offload,
                device_type=device_type,
                reshard_after_forward=False if dims.pp > 1 else None,
            )
        else:
            apply_replicate(model, dims, mesh, precision=precision, bf16_mode=bf16_mode)
            compress.register(model, pcfg, mesh["dp_replicate"].get_group())
    return model
