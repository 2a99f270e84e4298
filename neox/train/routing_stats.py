"""MoE routing statistics at log lines over the whole run, not one rank: every data-parallel rank routes its
own tokens and every pipeline stage holds its own MoE layers, so each rank's accumulated stats row (the E
per-expert counts, dropped assignments and the sums of aux loss, z-loss and router entropy with the number of
layer calls they cover; neox.model.moe) is summed over the data-parallel ranks and pipeline stages in one
all-reduce per log line. Counts come out summed and the rest averaged over (layer, rank, micro-batch) calls,
as moe.read_stats divides the summed row. Tensor-parallel ranks hold identical rows and are not summed.
"""

from __future__ import annotations

import torch

from neox.model import moe
from neox.parallel.comm import all_reduce_
from neox.parallel.mesh import submesh

# slots after the E per-expert counts in a layer's stats row (dropped, aux, z, entropy, calls)
EXTRA_SLOTS = 5


def stats_group(mesh):
    """The ranks whose routing statistics add up: all data-parallel ranks and pipeline stages of this tp
    position; None when that is this rank alone. The pipeline case flattens (pp, dp) once (idempotent)."""
    if mesh is None:
        return None
    sub = mesh["pp", "dp_replicate", "dp_shard"]._flatten("pp_dp") if mesh["pp"].size() > 1 else submesh(mesh, "dp")
    return sub.get_group() if sub.size() > 1 else None


def read(model: torch.nn.Module, mesh, num_experts: int, device: torch.device) -> dict:
    """moe.read_stats of `model` with every rank's rows added in (then reset); {} for a model without MoE.
    Every rank of the mesh must call it at the same log step (it is a collective unless one process runs)."""
    if num_experts <= 1:
        return {}
    group = stats_group(mesh)
    if group is None:
        return moe.read_stats(model) or {}
    layers = moe.moe_layers(model)
    rows = [m.stats for m in layers if m.stats is not None]
    # a stage without MoE layers (or before any forward) still takes part in the collective
    total = torch.stack(rows).sum(0) if rows else torch.zeros(num_experts + EXTRA_SLOTS, device=device)
    all_reduce_(total, group)
    if not layers:
        return {}  # this stage's log line is not written (only the last stage logs)
    for m in layers:
        m.stats = None
    layers[0].stats = total
    return moe.read_stats(model) or {}
