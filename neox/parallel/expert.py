"""Expert parallelism: each MoE layer's E experts are split over the `ep` ranks (E/ep whole experts each, the
weights DTensors sharded along the expert dimension, so DCP checkpoints reshard to any other ep), and each
layer's tokens travel to their experts' ranks and back by all-to-all.

The ep ranks are data-parallel ranks (GPT-NeoX instead splits experts over its model-parallel group). The dp
ranks are viewed as a 2-D mesh ("ep_replicate", "ep"), ep innermost (neighbouring ranks exchange tokens;
neox.parallel.mesh.expert_mesh): every rank routes its own tokens, sends each assignment to the rank of its
ep group holding its expert, runs its local experts as one grouped matmul over what it received, and sends
the results back. With expert_parallel_size below the data-parallel size, dp / ep groups hold the same
experts: replicas, whose expert gradients are summed over "ep_replicate". Dense weights keep their
data-parallel wrapper over all dp ranks (DDP or FSDP2); the expert weights are kept out of it (FSDP2's hooks
run on a module's forward, and the experts are reached through the dispatcher instead).

Gradient scale: the data-parallel mean takes 1/dp of the sum of every rank's gradient. A local expert's
gradient already sums the tokens of its whole ep group; `_ExpertGrad` multiplies it by 1/dp in the backward
and sums it over the replicas, so the expert weights see the data-parallel mean as every dense weight does.
That sum runs once per micro-batch (a sum of sums is the sum, so accumulation stays exact); the dense
wrappers reduce once per step.

Under tensor parallelism the MoE input is replicated over the tp ranks, so each tp position runs its own ep
groups (the dp ranks at that position) on the same tokens; under pipelines each stage's dp ranks do, and every
schedule runs the same micro-batches in the same order on all of them, so the all-to-alls pair up.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from neox.model.moe import Experts, moe_layers, sort_by_expert
from neox.parallel.comm import all_reduce_, all_to_all_single_


class _ExpertGrad(torch.autograd.Function):
    """Identity on a local expert weight; the backward scales its gradient and sums it over `group` (the
    replicas of these experts, None when there are none). Each micro-batch's gradient is summed as it is
    produced, so accumulation adds already-synchronised gradients (a sum of sums is the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, group) -> torch.Tensor:
        ctx.scale, ctx.group = scale, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad * ctx.scale
        if ctx.group is not None:
            all_reduce_(grad, ctx.group)
        return grad, None, None


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

    def __init__(self, group, ep: int, grad_scale: float, replica_group=None):
        self.group, self.ep, self.grad_scale, self.replica_group = group, ep, grad_scale, replica_group

    def local_weights(self, experts_mod: Experts) -> dict[str, torch.Tensor]:
        out = {}
        for name in experts_mod.weight_names:
            p = getattr(experts_mod, name)  # not named_parameters: FSDP2 swaps them for attributes
            local = p.to_local() if isinstance(p, DTensor) else p
            out[name] = _ExpertGrad.apply(local, self.grad_scale, self.replica_group)
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
        got = _AllToAll.apply(x.index_select(0, token).to(dtype), out_splits, in_splits, self.group)
        # received rows come by source rank, then local expert: regroup them by local expert for the matmul
        local_ids = torch.arange(local_e, device=x.device).repeat(self.ep).repeat_interleave(recv.reshape(-1))
        perm = torch.argsort(local_ids, stable=True)
        h = experts_mod.grouped(got.index_select(0, perm), recv.sum(0), self.local_weights(experts_mod))
        ys = _AllToAll.apply(torch.empty_like(h).index_copy(0, perm, h), in_splits, out_splits, self.group)
        ys = ys * w.index_select(0, order)[:, None].to(ys.dtype)
        return torch.zeros(n, x.shape[1], dtype=ys.dtype, device=x.device).index_add_(0, token, ys).to(x.dtype)


def apply_expert_parallel(model: nn.Module, mesh2d) -> list[nn.Module]:
    """Shard every MoE layer's experts over `mesh2d["ep"]` (neox.parallel.mesh.expert_mesh: this rank's ep
    group and, in "ep_replicate", the ranks holding the same experts) and give the layer an all-to-all
    dispatcher; returns the expert modules, which the dense data-parallel wrapper must leave alone."""
    ep_mesh, replicas = mesh2d["ep"], mesh2d["ep_replicate"]
    ep, dp = ep_mesh.size(), ep_mesh.size() * replicas.size()
    mods = []
    for layer in moe_layers(model):
        ex = layer.experts
        for name in ex.weight_names:
            p = getattr(ex, name)
            # every rank holds the same full value here (or a meta tensor): each keeps its slice, no traffic
            shard = distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(ex, name, nn.Parameter(shard, requires_grad=p.requires_grad))
        group = replicas.get_group() if replicas.size() > 1 else None
        layer.dispatcher = AllToAllDispatch(ep_mesh.get_group(), ep, 1.0 / dp, group)
        mods.append(ex)
    return mods
