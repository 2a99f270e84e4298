"""Data parallelism: DDP for ZeRO stage 0, FSDP2 (`fully_shard`) for stages 1-3, HSDP with dp_replicate.

How GPT-NeoX's zero_optimization.stage maps (docs/parallelism.md has the memory arithmetic):
- 0: plain DDP; every rank holds all parameters, gradients and optimizer state; gradients all-reduced.
  With tensor or pipeline parallelism the all-reduce runs through FSDP2's replicate mode, which understands
  DTensor parameters (DDP does not).
- 1, 2: FSDP2 with reshard_after_forward=False: optimizer state and gradients are sharded (gradients are
  reduce-scattered), parameters are gathered once per step and kept through the backward pass. FSDP2 has
  no mode that shards only the optimizer state, so 1 behaves as 2.
- 3: FSDP2 with reshard_after_forward=True: parameters are also sharded between forward and backward.
Each transformer block is its own FSDP unit (one all-gather / reduce-scatter per block); the root unit holds
the embeddings, final norm and output layer.
"""

from __future__ import annotations

import torch
from torch import nn


def mixed_precision(precision: str, bf16_mode: str = "autocast", fp32_allreduce: bool = False):
    """FSDP2's dtypes: bf16 autocast gathers parameters in bf16; fp16 (and fp32) gather the fp32 masters, which
    autocast casts per op. Gradients are reduced in the training precision unless `fp32_allreduce`.

    GPT-NeoX's `fp32_allreduce` (default false: "during gradient averaging perform allreduce with 32 bit values"
    only when set) decides the reduction dtype. Off, fp16 and bf16 runs reduce-scatter half-size gradients: half
    the traffic of fp32 (torchtitan's default, `mixed_precision_reduce: float32`, pays for accuracy with it).
    FSDP2 divides fp16 gradients by about sqrt(dp) before and after the reduction, so a sum over ranks does not
    overflow where each rank's does not; one that does anyway makes the norm non-finite and the fp16 loss scaler
    skips the step and halves the scale, as DeepSpeed's fp16 reduction does. bf16 keeps fp32's range but 8
    mantissa bits: GPT-NeoX's bf16 example configs set `fp32_allreduce: true`, and so should long bf16 runs over
    many ranks. The reduced gradients are stored in the parameters' dtype (fp32 masters) either way.
    Pure bf16 weights (bf16_mode: pure) have bf16 gradients: reduced in bf16, or in fp32 with the flag."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reduce = torch.float32 if fp32_allreduce else None
    if precision == "bf16" and bf16_mode == "autocast":
        # None: reduce in param_dtype, bf16
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    if precision == "fp16":
        return MixedPrecisionPolicy(reduce_dtype=reduce or torch.float16)
    return MixedPrecisionPolicy(reduce_dtype=reduce)


def offload_policy(cpu_offload: bool, device_type: str):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if not cpu_offload:
        return OffloadPolicy()
    # CPUOffloadPolicy pins memory by default, which fails on a machine without an accelerator
    return CPUOffloadPolicy(pin_memory=device_type == "cuda")


def dp_mesh_for(dims, mesh):
    """The mesh FSDP2 shards over: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP."""
    if dims.dp_replicate > 1 and dims.dp_shard > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"] if dims.dp_shard > 1 else mesh["dp_replicate"]


def _units(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    return list(layers.values()) if layers is not None else []


def apply_fsdp(
    model: nn.Module,
    dims,
    mesh,
    *,
    precision: str = "fp32",
    bf16_mode: str = "autocast",
    fp32_allreduce: bool = False,
    cpu_offload: bool = False,
    device_type: str = "cpu",
    reshard_after_forward=None,
    ignored: list[nn.Module] = (),
) -> nn.Module:
    """fully_shard each block, then the root. `reshard_after_forward` overrides the stage's choice (pipeline
    stages pass False: zero-bubble schedules run the weight backward after the next forward, and gradients
    from resharded parameters come out silently wrong). The parameters of `ignored` modules (expert-parallel
    experts, neox.parallel.expert) stay as they are."""
    from torch.distributed.fsdp import fully_shard

    reshard = dims.zero_stage == 3 if reshard_after_forward is None else reshard_after_forward
    kw = dict(
        mesh=dp_mesh_for(dims, mesh),
        mp_policy=mixed_precision(precision, bf16_mode, fp32_allreduce),
        offload_policy=offload_policy(cpu_offload, device_type),
        ignored_params={p for m in ignored for p in m.parameters()} or None,
    )
    for unit in _units(model):
        fully_shard(unit, reshard_after_forward=reshard, **kw)
    # the root's parameters (embeddings, head) are needed again at once by the backward pass
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


def apply_replicate(
    model: nn.Module,
    dims,
    mesh,
    *,
    precision: str = "fp32",
    bf16_mode: str = "autocast",
    fp32_allreduce: bool = False,
    ignored: list[nn.Module] = (),
) -> nn.Module:
    """ZeRO 0. Without tensor parallelism: DDP (composable form, so the module keeps its class and
    parameter names; DDP communication hooks from neox.parallel.compress register on it). With DTensor
    parameters, or on a pipeline stage (the schedule drives FSDP-style gradient sync, not DDP's reducer):
    FSDP2's replicate, which all-reduces gradients over the data-parallel dim in `mixed_precision`'s dtype.
    DDP all-reduces gradients in their own dtype (fp32 masters under autocast; `fp32_allreduce` does not apply):
    `parallel.grad_compression: fp16` halves that traffic. The parameters of `ignored` modules (expert-parallel
    experts) are left out."""
    if dims.tp == 1 and dims.pp == 1 and not ignored:
        from torch.distributed._composable.replicate import replicate

        return replicate(model, device_mesh=mesh["dp_replicate"])
    from torch.distributed._composable.replicate_with_fsdp import replicate as replicate_fsdp

    # `ignored` (expert-parallel experts) also takes this form: DDP's replicate loses their gradients
    kw = dict(
        mesh=mesh["dp_replicate"],
        mp_policy=mixed_precision(precision, bf16_mode, fp32_allreduce),
        ignored_params={p for m in ignored for p in m.parameters()} or None,
    )
    for unit in _units(model):
        replicate_fsdp(unit, **kw)
    replicate_fsdp(model, **kw)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (False) or do (True) the gradient reduction of the next backward: gradient accumulation
    reduces only on the last micro-batch. A no-op for a model without data parallelism."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(enabled)
