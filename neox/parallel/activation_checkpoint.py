"""Activation checkpointing (train.checkpoint_activations), applied to a GPT or one pipeline stage of it.

Granularities (train.checkpoint_granularity):
- full: the backward pass recomputes whole blocks; with checkpoint_num_layers = n > 1, n consecutive blocks
  form one checkpoint (only the first one's input is kept, as GPT-NeoX/Megatron's checkpoint_num_layers).
- selective_attention: only each block's attention is recomputed; the MLP keeps its activations.
- selective_op: each block is checkpointed with PyTorch's selective activation checkpointing: the outputs of
  matmuls, attention kernels and tensor-parallel reductions are kept, the cheap ops between them (norms,
  activations, dropout, residual adds) are recomputed.

Only `forward` attributes of the block instances are replaced, so parameter names (checkpoints, tensor- and
data-parallel plans) are unchanged and the model code knows nothing of this. Recomputation uses
torch.utils.checkpoint without reentrancy, which replays the RNG state: dropout masks match the forward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from neox.errors import ConfigError

GRANULARITIES = ("full", "selective_attention", "selective_op")

_aten = torch.ops.aten
# Kept by selective_op: what is expensive to recompute (matmuls, attention) or would repeat communication.
_KEEP = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _recomputed(fn, **options):
    return functools.partial(checkpoint, fn, use_reentrant=False, **options)


class _Group:
    """n consecutive blocks run as one checkpoint by the first; the others pass their input through when the
    model's loop calls them, and run for real only when the group calls them (`inside`)."""

    def __init__(self, blocks: list[nn.Module]):
        self.inside = False
        self.forwards = [b.forward for b in blocks]
        self.blocks = blocks
        blocks[0].forward = _recomputed(self._run)
        for block, forward in zip(blocks[1:], self.forwards[1:]):
            block.forward = functools.partial(self._follower, forward)

    def _run(self, x, *args, **kwargs):
        x = self.forwards[0](x, *args, **kwargs)
        self.inside = True
        try:
            for block in self.blocks[1:]:
                x = block(x, *args, **kwargs)  # through __call__: module hooks still run
        finally:
            self.inside = False
        return x

    def _follower(self, forward, x, *args, **kwargs):
        return forward(x, *args, **kwargs) if self.inside else x


def apply(model: nn.Module, train_cfg, *, fsdp: bool = False) -> nn.Module:
    """Checkpoint `model`'s blocks (in place) as train_cfg asks; nothing when checkpoint_activations is off.

    `fsdp`: the blocks are FSDP units; a group of several blocks cannot be one checkpoint then (each
    block's FSDP hooks would run in the wrong order around the shared recomputation), so it is refused."""
    if not train_cfg.checkpoint_activations:
        return model
    kind, n = train_cfg.checkpoint_granularity, train_cfg.checkpoint_num_layers
    if kind not in GRANULARITIES:
        raise ConfigError(f"train.checkpoint_granularity: expected one of {', '.join(GRANULARITIES)}, got {kind!r}")
    if n > 1 and fsdp:
        raise ConfigError(
            f"train.checkpoint_num_layers: {n} blocks per checkpoint is not supported with ZeRO stage >= 1 over "
            "several data-parallel ranks (each block is its own FSDP unit); set it to 1 or use zero_stage 0"
        )
    blocks = list(model.layers.values())
    if kind == "selective_attention":
        for block in blocks:
            block.attention.forward = _recomputed(block.attention.forward)
    elif kind == "selective_op":
        for block in blocks:
            block.forward = _recomputed(block.forward, context_fn=_selective_contexts)
    elif n == 1:
        for block in blocks:
            block.forward = _recomputed(block.forward)
    else:
        for start in range(0, len(blocks), n):
            group = blocks[start : start + n]
            if len(group) == 1:
                group[0].forward = _recomputed(group[0].forward)
            else:
                _Group(group)
    return model
