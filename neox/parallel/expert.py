"""Expert parallelism: each MoE layer's E experts are split over the `ep` ranks (E/ep whole experts each, the
weights DTensors sharded along the expert dimension, so DCP checkpoints reshard to any other ep), and each
layer's tokens travel to their experts' ranks and back by all-to-all.

The ep ranks are data-parallel ranks (GPT-NeoX instead splits experts over its model-parallel group): every
rank routes its own tokens, sends each assignment to the rank holding its expert, runs its local experts as one
grouped matmul over what it received, and sends the results back. Dense weights keep their data-parallel
wrapper (DDP or FSDP2); the expert weights are kept out of it: their gradient is already the sum over the
tokens of all ep ranks, and, with expert_parallel_size equal to the data-parallel size, only needs the
data-parallel mean's 1/dp, applied in the backward pass (`_ScaleGrad`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from neox.model.moe import Experts, moe_layers, sort_by_expert
from neox.parallel.comm import all_to_all_single_


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        all_to_all_single_(out, x.contiguous(), group, out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        all_to_all_single_(back, grad.contiguous(), ctx.group, in_splits, out_splits)
        return back, None, None, None


class AllToAllDispatch:
    """MoE.dispatcher for one layer under expert parallelism (the signature of neox.model.moe.dispatch)."""

    def __init__(self, group, ep: int, grad_scale: float):
        self.group, self.ep, self.grad_scale = group, ep, grad_scale

    def local_weights(self, experts_mod: Experts) -> dict[str, torch.Tensor]:
        out = {}
        for name in experts_mod.weight_names:
            p = getattr(experts_mod, name)  # not named_parameters: DDP's replicate swaps them for attributes
            local = p.to_local() if isinstance(p, DTensor) else p
            out[name] = _ScaleGrad.apply(local, self.grad_scale)
        return out

    def __call__(self, experts_mod: Experts, x, weights, experts, keep, how: str, cap: int) -> torch.Tensor:
        n, k = experts.shape
        e = experts_mod.num_experts
        local_e = e // self.ep
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        order, counts, _ = sort_by_expert(experts, e)  # grouped by expert, so by destination rank
        token = order // k
        w = weights.reshape(-1) if keep is None else weights.reshape(-1) * keep.reshape(-1)
        send = counts.view(self.ep, local_e)
        recv = torch.empty_like(send)
        all_to_all_single_(recv, send, self.group)  # [source rank, local expert] loads
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()  # the host read all-to-all needs
        got = _AllToAll.apply(x[token].to(dtype), out_splits, in_splits, self.group)
        # received rows come by source rank, then local expert: regroup them by local expert for the matmul
        local_ids = torch.arange(local_e, device=x.device).repeat(self.ep).repeat_interleave(recv.reshape(-1))
        perm = torch.argsort(local_ids, stable=True)
        h = experts_mod.grouped(got[perm], recv.sum(0), self.local_weights(experts_mod))
        ys = _AllToAll.apply(torch.empty_like(h).index_copy(0, perm, h), in_splits, out_splits, self.group)
        ys = ys * w[order, None].to(ys.dtype)
        return torch.zeros(n, x.shape[1], dtype=ys.dtype, device=x.device).index_add_(0, token, ys).to(x.dtype)


def apply_expert_parallel(model: nn.Module, ep_mesh, dp: int) -> list[nn.Module]:
    """Shard every MoE layer's experts over `ep_mesh` (1-D, the ep ranks) and give the layer an all-to-all
    dispatcher; returns the expert modules, which the data-parallel wrapper must leave alone."""
    ep = ep_mesh.size()
    mods = []
    for layer in moe_layers(model):
        ex = layer.experts
        for name in ex.weight_names:
            p = getattr(ex, name)
            # every rank holds the same full value here (or a meta tensor): each keeps its slice, no traffic
            shard = distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(ex, name, nn.Parameter(shard, requires_grad=p.requires_grad))
        layer.dispatcher = AllToAllDispatch(ep_mesh.get_group(), ep, 1.0 / dp)
        mods.append(ex)
    return mods


def expert_mesh(dims, device_type: str):
    """The ep ranks as a 1-D DeviceMesh: with expert_parallel_size equal to the data-parallel size, the
    data-parallel ranks of this rank's (pp, tp) position, which is the flattened dp dim's arrangement."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=("ep_pp", "ep", "ep_tp"))
    return mesh["ep"]
