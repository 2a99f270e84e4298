"""Numbers that must agree across the mesh: the loss on vocab-sharded logits, the global gradient norm (and
clipping by it), and metrics averaged over data-parallel ranks.

Gradient norm: one model can hold plain tensors (replicated: DDP, or norms under TP without SP),
DTensors on the tp mesh and DTensors on the (dp, tp) mesh at once, and `clip_grad_norm_` refuses the mix.
Here each group of gradients with the same mesh and placements gets its norm (a DTensor norm reduces over
exactly the dims it is sharded on), the squares are summed, and pipeline stages add theirs over "pp".
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neox.parallel.comm import all_reduce_, broadcast_
from neox.parallel.mesh import submesh

# Set (by neox.parallel.pipeline) on the last pipeline stage's copy of a tied embedding: it is clipped with
# everything else but its gradient, equal to the first stage's, must count once in the norm.
TIED_COPY_ATTR = "_neox_pipeline_tied_copy"


def loss_context(logits_are_sharded: bool):
    """Wrap forward *and* backward of the loss in this when logits are vocab-sharded (tensor parallel)."""
    if not logits_are_sharded:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [B, T] (a plain tensor) from logits [B, T, V], plain or vocab-sharded DTensor.
    A sharded call must run inside `loss_context(True)`."""
    from torch.distributed.tensor import DTensor

    flat = logits.flatten(0, 1)
    if not isinstance(logits, DTensor):
        flat = flat.float()
    losses = F.cross_entropy(flat, labels.flatten(), reduction="none")
    if isinstance(losses, DTensor):
        # replicated over tp: every rank holds the full per-token loss
        losses = losses.to_local()
    return losses.view(labels.shape).float()


def masked_mean_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy over the tokens loss_mask keeps (GPT-NeoX's per-micro-batch normalisation)."""
    losses = token_losses(logits, labels)
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def vocab_shard(logits) -> tuple[torch.Tensor, int, int]:
    """(this rank's local block [..., V / tp], its first global vocabulary index, its width) of vocab-sharded
    logits (a DTensor sharded on its last dim over one mesh dim; the padded vocabulary divides evenly by tp)."""
    from torch.distributed.tensor import Shard

    if tuple(logits.placements) != (Shard(logits.ndim - 1),):
        raise ValueError(f"expected logits sharded on the vocabulary over one mesh dim, got {logits.placements}")
    local = logits.to_local()
    width = local.shape[-1]
    return local, logits.device_mesh.get_local_rank() * width, width


def sum_over_shards(part: torch.Tensor, like) -> torch.Tensor:
    """The sum over the ranks of `like`'s mesh of each rank's `part` (a plain tensor, every rank's the same
    shape), a plain tensor on every rank. Differentiable for a result that every rank then computes the same
    replicated loss from (so each rank's gradient of it is the whole gradient, handed to its own part)."""
    from torch.distributed.tensor import DTensor, Partial

    return DTensor.from_local(part, like.device_mesh, [Partial()], run_check=False).full_tensor()


def pick_from_vocab(block: torch.Tensor, start: int, like, index: torch.Tensor) -> torch.Tensor:
    """[N, V] at global vocabulary indices [N, k]; `block` is this rank's part from global index `start` of
    `like` (vocab-sharded logits), or the whole vocabulary when `like` is None. Sharded: each rank reads the
    indices its block holds (zeros elsewhere, through the block, so every rank has a graph) and the results are
    summed across the ranks: N*k numbers, differentiably."""
    if like is None:
        return block.gather(1, index)
    width = block.shape[-1]
    mine = (index >= start) & (index < start + width)
    picked = block.gather(1, (index - start).clamp(0, width - 1))
    return sum_over_shards(torch.where(mine, picked, torch.zeros((), dtype=picked.dtype, device=picked.device)), like)


class _ShardLogSoftmax(torch.autograd.Function):
    """log-softmax over a vocabulary split across the ranks of `group`, on this rank's block [N, V / tp]."""

    @staticmethod
    def forward(ctx, block: torch.Tensor, group) -> torch.Tensor:
        peak = all_reduce_(block.amax(-1, keepdim=True), group, op=dist.ReduceOp.MAX)
        shifted = block - peak
        out = shifted - all_reduce_(shifted.exp().sum(-1, keepdim=True), group).log()
        ctx.save_for_backward(out)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        # d/dx_i = g_i - softmax_i * (sum of g over the whole vocabulary): each rank holds its block's g
        total = all_reduce_(grad.sum(-1, keepdim=True), ctx.group)
        return grad - out.exp() * total, None


def shard_log_softmax(block: torch.Tensor, like) -> torch.Tensor:
    """log-softmax over the whole vocabulary of this rank's local block [..., V / tp] of `like` (vocab-sharded
    logits), differentiable for any loss: one max and one sum per row cross the ranks each way. (Not
    loss_parallel's log_softmax: its backward passes the gradient through unchanged, right only when nll_loss
    follows, as in cross entropy.)"""
    return _ShardLogSoftmax.apply(block, like.device_mesh.get_group())


def _pp_group(mesh):
    if mesh is None or mesh["pp"].size() == 1:
        return None
    return mesh["pp"].get_group()


def _by_layout(grads) -> list[list[torch.Tensor]]:
    """Gradients grouped so each group is all plain tensors (one device) or all DTensors with one mesh and
    placement: what foreach kernels and DTensor norms accept."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(g)
    return list(groups.values())


def _local(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of a group's gradients (elementwise scaling acts on them alike, whatever the placement)."""
    from torch.distributed.tensor import DTensor

    return [g.to_local() for g in grads] if grads and isinstance(grads[0], DTensor) else grads


def scale_grads_(parameters, factor: float | torch.Tensor) -> None:
    """Multiply every gradient by `factor` (fp16 unscaling, clipping), whatever mix of plain tensors and
    DTensors: one foreach kernel per group. A tensor factor stays on its device (no host sync)."""
    for grads in _by_layout(p.grad for p in parameters if p.grad is not None):
        grads = _local(grads)
        if isinstance(factor, torch.Tensor):
            torch._foreach_mul_(grads, factor.to(grads[0].device, non_blocking=True))
        else:
            torch._foreach_mul_(grads, factor)


def grad_norm(parameters, mesh=None, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients of the whole model (every stage, every shard), the same on every rank.

    A 0-d float32 tensor on the gradients' device (the first group's, when CPU-offloaded and device gradients
    are mixed): nothing here waits for the device, so a step that does not log never syncs on the norm."""
    from torch.distributed.tensor import DTensor

    # a pipeline's tied-embedding copy has the first stage's gradient: counted once, there
    groups = _by_layout(p.grad for p in parameters if p.grad is not None and not getattr(p, TIED_COPY_ATTR, False))
    inf = math.isinf(norm_type)
    device = groups[0][0].device if groups else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups:
        n = torch.nn.utils.get_total_norm(grads, norm_type)  # foreach where supported
        if isinstance(n, DTensor):
            n = n.full_tensor()
        n = n.detach().float().to(device, non_blocking=True)
        total = torch.maximum(total, n) if inf else total + n**norm_type
    group = _pp_group(mesh)
    if group is not None:
        all_reduce_(total, group, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
    return total if inf else total ** (1.0 / norm_type)


def clip_grad_norm_(parameters, max_norm: float, mesh=None, norm_type: float = 2.0) -> torch.Tensor:
    """Scale all gradients so their global norm is at most max_norm (as torch.nn.utils.clip_grad_norm_ does
    for one process: coefficient min(1, max_norm / (norm + 1e-6)), applied always, so that no host read of the
    norm decides it); returns the norm before clipping, on the device. max_norm <= 0 only measures."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, mesh, norm_type)
    if max_norm > 0:
        scale_grads_(params, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _all_reduce_sum(t: torch.Tensor, mesh, dim: str) -> tuple[torch.Tensor, int]:
    if mesh is None:
        return t, 1
    sub = submesh(mesh, dim)
    if sub.size() == 1:
        return t, 1
    return all_reduce_(t, sub.get_group()), sub.size()


def mean_over(values, mesh, dim: str = "dp") -> torch.Tensor:
    """Average a metric (a number or a tensor of them, e.g. one per step) over one mesh dim (default: all
    data-parallel ranks); the value on a single process. The result stays where `values` is: reading it is
    the caller's (one) host sync."""
    total, n = _all_reduce_sum(torch.as_tensor(values, dtype=torch.float32).detach().clone(), mesh, dim)
    return total / n


def sum_over(values, mesh, dim: str = "dp") -> torch.Tensor:
    """Sum a count (tokens, samples) over one mesh dim."""
    return _all_reduce_sum(torch.as_tensor(values, dtype=torch.float64).detach().clone(), mesh, dim)[0]


def broadcast_from_last_stage(value: torch.Tensor, mesh) -> torch.Tensor:
    """Under pipeline parallelism only the last stage computes the loss: give every stage the same number."""
    group = _pp_group(mesh)
    if group is None:
        return value
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    return broadcast_(t, dist.get_global_rank(group, mesh["pp"].size() - 1), group)
