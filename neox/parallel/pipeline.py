"""Pipeline parallelism with torch.distributed.pipelining: stage split, schedules and a step runner.

The layer stack is cut into `pipe_parallel_size * pipe_stages_per_rank` contiguous stages, balanced by
parameter count (embeddings and the output layer count towards the first and last stage) or by layer count
(`parallel.pipe_partition_method`). Stage s runs on pipeline rank s % pp (the "loop" placement interleaved
schedules expect). A stage is the GPT itself with the other stages' layers removed and `embed_in` /
`final_layer_norm` / `embed_out` set to None where they do not belong (docs/architecture.md), so parameter
names, tensor-parallel plans, FSDP units and checkpoints work unchanged.

Tied embeddings (GPT-NeoX / Megatron): the last stage keeps its own copy of `embed_in.weight`, under the same
name, as the output layer. Both copies start equal, their gradients are summed over the (first, last) pair
after every backward, so both optimizers take identical steps; the gradient norm counts the copy once.

Loss: each micro-batch's masked-mean token loss is scaled by 1/n_micro before its backward, so gradients equal
the single-process accumulation; only the last stage has the loss, which is then broadcast over "pp".
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn

from neox.errors import ConfigError
from neox.model.moe import moe_layers, set_aux_loss_scale
from neox.parallel.comm import all_reduce_
from neox.parallel.mesh import dist_timeout, submesh
from neox.parallel.reduce import TIED_COPY_ATTR, broadcast_from_last_stage, loss_context, masked_mean_loss

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble")
INTERLEAVED = ("interleaved_1f1b", "interleaved_zero_bubble")


# ---------------------------------------------------------------- checks and partitioning


def validate(pcfg, num_layers: int, n_micro: int, source: str = "config") -> None:
    """Schedule constraints, as one-line ConfigErrors before any stage is built."""
    pp, v, kind = pcfg.pipe_parallel_size, pcfg.pipe_stages_per_rank, pcfg.pipe_schedule
    if kind not in SCHEDULES:
        raise ConfigError(f"{source}: parallel.pipe_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if pcfg.pipe_partition_method not in ("parameters", "uniform"):
        raise ConfigError(
            f"{source}: parallel.pipe_partition_method must be parameters or uniform, "
            f"got {pcfg.pipe_partition_method!r}"
        )
    if v > 1 and kind not in INTERLEAVED:
        raise ConfigError(
            f"{source}: parallel.pipe_stages_per_rank={v} needs pipe_schedule: interleaved_1f1b or "
            f"interleaved_zero_bubble (gpipe and 1f1b run one stage per rank)"
        )
    if num_layers < pp * v:
        raise ConfigError(
            f"{source}: model.num_layers={num_layers} is fewer than the {pp * v} pipeline stages "
            f"(pipe_parallel_size {pp} * pipe_stages_per_rank {v})"
        )
    if kind == "1f1b" and n_micro < pp:
        # 1F1B's warm-up puts a micro-batch in flight on every stage; with fewer it hangs or fails
        raise ConfigError(
            f"{source}: pipe_schedule 1f1b needs gradient_accumulation_steps >= pipe_parallel_size "
            f"({n_micro} < {pp}); raise gradient_accumulation_steps or use gpipe"
        )
    if kind in INTERLEAVED:
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            raise ConfigError(
                f"{source}: {kind} needs gradient_accumulation_steps divisible by "
                f"max(1, accumulation // pipe_parallel_size) = {rounds}; got {n_micro}; use a "
                f"multiple of pipe_parallel_size={pp}"
            )


def partition(
    weights: list[int], n_stages: int, method: str = "parameters", first_extra: int = 0, last_extra: int = 0
) -> list[range]:
    """Contiguous, non-empty layer ranges, one per stage.

    "uniform": layer counts differ by at most one (the earlier stages take the extra layers).
    "parameters": the split that minimises the heaviest stage, where a stage weighs the sum of its layers'
    weights plus `first_extra` (embeddings) on stage 0 and `last_extra` (final norm, output layer) on the last.
    """
    n = len(weights)
    if n_stages < 1 or n < n_stages:
        raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages")
    if method == "uniform":
        base, extra = divmod(n, n_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(n_stages)]
    elif method == "parameters":
        sizes = _balanced_sizes(weights, n_stages, first_extra, last_extra)
    else:
        raise ValueError(f"unknown partition method {method!r}")
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def _balanced_sizes(weights, n_stages, first_extra, last_extra) -> list[int]:
    # Exact min-max contiguous partition by dynamic programming: best[s][i] is the lightest possible heaviest
    # stage when the first i layers form s stages. Layer counts are small (<= a few hundred).
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def load(s: int, i: int, j: int) -> int:  # stage s holds layers i..j-1
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0) + (last_extra if s == n_stages - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], load(s - 1, i, j))
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    sizes, j = [], n
    for s in range(n_stages, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def stage_ranges(model: nn.Module, n_stages: int, method: str) -> list[range]:
    """Layer ranges of a neox.model.GPT's stages (layer keys are "0".."L-1")."""
    weights = [_numel(model.layers[str(i)]) for i in range(len(model.layers))]
    first = _numel(model.embed_in) + _numel(model.embed_pos)
    # the tied head costs the last stage a full copy of the embedding matrix (and its matmul)
    head = _numel(model.embed_out) if model.embed_out is not None else (_numel(model.embed_in) if model.tied else 0)
    return partition(weights, n_stages, method, first, _numel(model.final_layer_norm) + head)


# ---------------------------------------------------------------- stage modules


class TiedHeadCopy(nn.Embedding):
    """The last stage's copy of the tied `embed_in.weight`, kept under that name so checkpoints and optimizer
    state line up with every other layout. It receives hidden states and passes them on: GPT.forward then
    skips nothing it should run and ends with `linear(x, embed_in.weight)`, the tied output layer."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` without its parameterised top-level parts (the caller attaches the ones it needs)."""
    parts = ("embed_in", "embed_pos", "final_layer_norm", "embed_out", "layers")
    saved = {name: getattr(model, name) for name in parts}
    try:
        for name in parts:
            setattr(model, name, None)
        return copy.deepcopy(model)
    finally:
        for name, module in saved.items():
            setattr(model, name, module)


def build_stage(model: nn.Module, stage: int, n_stages: int, layers: range) -> nn.Module:
    """Stage `stage` of `model`: its layers (shared with `model`, not copied) and the ends it owns."""
    first, last = stage == 0, stage == n_stages - 1
    mod = _skeleton(model)
    mod.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    if first:
        mod.embed_in, mod.embed_pos = model.embed_in, model.embed_pos
    if last:
        mod.final_layer_norm, mod.embed_out = model.final_layer_norm, model.embed_out
        if model.embed_out is None and model.tied and not first:
            w = model.embed_in.weight
            head = TiedHeadCopy(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
            with torch.no_grad():
                head.weight.copy_(w)
            head.weight.requires_grad_(w.requires_grad)  # frozen with the embedding (LoRA)
            mod.embed_in = head
            # the copy stands for the output layer only: no position or embedding dropout to add again
            mod.sinusoidal, mod.embed_dropout = None, nn.Identity()
    return mod


def local_view(model: nn.Module, stages: list[nn.Module]) -> nn.Module:
    """One module holding everything this rank owns, under the GPT's names: what the optimizer, gradient
    clipping and checkpoints see. With one stage per rank it is that stage."""
    if len(stages) == 1:
        return stages[0]
    view = _skeleton(model)
    view.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
    for name in ("embed_in", "embed_pos", "final_layer_norm", "embed_out"):
        owners = [getattr(s, name) for s in stages if getattr(s, name) is not None]
        setattr(view, name, owners[0] if owners else None)
    return view


def mark_tied_copy(stage: nn.Module) -> None:
    """Flag the last stage's tied copy (after parallel wrapping, which may replace parameter objects) so the
    gradient norm counts the shared weight once (neox.parallel.reduce.grad_norm skips flagged parameters)."""
    if isinstance(stage.embed_in, TiedHeadCopy):
        setattr(stage.embed_in.weight, TIED_COPY_ATTR, True)


def gather_stages(tensors: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    """Every pipeline stage's `tensors` (CPU tensors by parameter name, disjoint across stages) merged, on
    every rank of the "pp" group; unchanged without pipeline stages. Collective over "pp"."""
    if mesh is None or mesh["pp"].size() == 1:
        return tensors
    parts: list = [None] * mesh["pp"].size()
    dist.all_gather_object(parts, tensors, group=mesh["pp"].get_group())
    return {k: v for part in parts for k, v in part.items()}


def _pair_group(mesh, timeout=None):
    """Process group of this rank's (first stage, last stage) pair with the same dp/tp coordinates (the default
    group's backend; `timeout` as the mesh's groups).

    Always a group of its own, even when pp == 2: the schedule's point-to-point traffic runs on the pp group,
    and a collective there can be matched against a receive the schedule still has posted."""
    pp = mesh["pp"].size()
    ranks = mesh.mesh.reshape(pp, -1)
    mine = None
    for col in range(ranks.shape[1]):  # every rank creates every group, in the same order
        pair = [int(ranks[0, col]), int(ranks[-1, col])]
        g = dist.new_group(pair, timeout=timeout)
        if dist.get_rank() in pair:
            mine = g
    return mine


# ---------------------------------------------------------------- the runner


def _schedule_class(kind: str, multi: bool):
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
        ScheduleLoopedBFS,
    )

    if kind == "gpipe":
        return ScheduleLoopedBFS if multi else ScheduleGPipe
    if kind == "1f1b":
        return Schedule1F1B
    if kind == "interleaved_zero_bubble":
        # correct only while FSDP keeps parameters gathered from forward to the weight backward (resharded
        # in between, the weight gradients come out silently wrong): neox.parallel.apply gives pipeline
        # stages reshard_after_forward=False
        return ScheduleInterleavedZeroBubble
    return ScheduleInterleaved1F1B


class PipelineRunner:
    """The trainer's step runner under pipeline parallelism (neox.parallel.runner.StepRunner):
    `forward_backward(micro_batches, loss_scale)` runs one schedule over the step's micro-batches and returns
    the mean loss on every rank; `eval_loss(batch)` runs one micro-batch forward through the pipeline."""

    def __init__(
        self,
        stages: list[nn.Module],
        stage_ids: list[int],
        n_stages: int,
        mesh,
        n_micro: int,
        schedule: str,
        precision,
        device: torch.device,
        tied: bool,
        pass_positions: bool = False,
        pass_segments: bool = False,
        vocab_parallel: bool = False,
        timeout=None,
        loss_fn=masked_mean_loss,
    ):
        from torch.distributed.pipelining import PipelineStage

        self.stages, self.stage_ids, self.n_stages = stages, stage_ids, n_stages
        self.mesh, self.n_micro, self.precision, self.device = mesh, n_micro, precision, device
        self.pass_positions, self.pass_segments = pass_positions, pass_segments
        self.vocab_parallel = vocab_parallel
        self.loss_fn = loss_fn
        self._extras: dict = {}  # the step's batch entries the loss names (batch_keys), rows concatenated
        self._eval_fn = self._objective_loss  # what an evaluation forward computes on the last stage
        self.has_first, self.has_last = 0 in stage_ids, n_stages - 1 in stage_ids
        group = mesh["pp"].get_group()
        self._loss_scale = 1.0
        self._step_losses: list = []  # this step's per-micro-batch losses (last stage)

        def get_mesh(names, layout):
            # activations crossing stages may be DTensors (sequence parallel): rebuild their mesh by name
            return submesh(mesh, names[0]) if len(names) == 1 else mesh[tuple(names)]

        def pipe_stages():
            return [
                PipelineStage(m, s, n_stages, device, group=group, get_mesh=get_mesh) for m, s in zip(stages, stage_ids)
            ]

        multi = len(stages) > 1
        cls = _schedule_class(schedule, multi)
        self.schedule = cls(
            pipe_stages() if multi else pipe_stages()[0], n_micro, loss_fn=self._loss_fn, scale_grads=False
        )
        # Evaluation runs one micro-batch at a time, on stage objects of its own (a stage remembers the
        # micro-batch count it was set up for).
        eval_cls = _schedule_class("gpipe", multi)
        self.eval_schedule = eval_cls(
            pipe_stages() if multi else pipe_stages()[0], 1, loss_fn=self._eval_loss_fn, scale_grads=False
        )

        # `tied` comes from the whole model, so every rank agrees on creating the pair groups
        self.pair_group = _pair_group(mesh, timeout) if tied else None
        for m in stages:
            _drop_placeholder_routing_stats(m)

    # -- loss: target packs labels, loss mask and each row's index in the step's batch as [b, 3, T], so the
    # schedule splits them with the batch; the row indices pick the micro-batch's rows of the entries an
    # objective's loss names (neox.train.preference: reference log-probabilities; a micro-batch's chosen and
    # rejected rows travel together, as the data loader made them)
    def _objective_loss(self, logits, target):
        extras = {k: v[target[:, 2, 0]] for k, v in self._extras.items()}
        return self.loss_fn(logits, target[:, 0], target[:, 1], **extras)

    def _loss_fn(self, logits, target):
        if not _shapes_known(self.schedule):
            # the schedule's shape inference runs the loss once on placeholder activations before the first
            # micro-batch: any loss of the logits serves it, and an objective's statistics must not see it
            return masked_mean_loss(logits, target[:, 0], target[:, 1])
        loss = self._objective_loss(logits, target)
        self._step_losses.append(loss.detach())
        return loss * (self._loss_scale / self.n_micro)

    def _eval_loss_fn(self, logits, target):
        return self._eval_fn(logits, target)

    def _inputs(self, micro_batches: list[dict]):
        def cat(key):
            return torch.cat([mb[key] for mb in micro_batches]).to(self.device)

        kwargs = {}
        if self.pass_positions and "position_ids" in micro_batches[0]:
            kwargs["position_ids"] = cat("position_ids")
        if self.pass_segments and "segment_ids" in micro_batches[0]:
            kwargs["segment_ids"] = cat("segment_ids")
        args = (cat("tokens"),) if self.has_first else ()
        target = None
        if self.has_last:
            labels = cat("labels")
            rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
            target = torch.stack([labels, cat("loss_mask").to(torch.long), rows], dim=1)
            keys = getattr(self.loss_fn, "batch_keys", ())
            self._extras = {k: cat(k) for k in keys if k in micro_batches[0]}
        return args, kwargs, target

    def _run(self, schedule, micro_batches: list[dict], train: bool):
        args, kwargs, target = self._inputs(micro_batches)
        losses: list = []
        autocast = self.precision.autocast() if self.precision is not None else contextlib.nullcontext()
        with autocast, loss_context(self.vocab_parallel and self.has_last):
            if train:
                schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                schedule.eval(*args, target=target, losses=losses, **kwargs)
        return losses

    def forward_backward(self, micro_batches: list[dict], loss_scale: float = 1.0) -> torch.Tensor:
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"pipeline built for {self.n_micro} micro-batches, got {len(micro_batches)}")
        self._loss_scale = loss_scale
        self._step_losses = []
        for m in self.stages:
            m.train()
            set_aux_loss_scale(m, loss_scale / self.n_micro)  # MoE aux losses: the token loss's factor
        self._run(self.schedule, micro_batches, train=True)
        self._sum_tied_grads()
        # the first step also calls the loss once on placeholder outputs (shape inference): keep the real ones
        mean = torch.stack(self._step_losses[-self.n_micro :]).mean() if self.has_last else torch.zeros(())
        return broadcast_from_last_stage(mean.float().cpu(), self.mesh)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        return self._eval(batch, self._objective_loss, ())

    @torch.no_grad()
    def eval_rows(self, batch: dict, fn) -> torch.Tensor:
        return self._eval(
            batch, lambda logits, target: fn(logits, target[:, 0], target[:, 1]), batch["tokens"].shape[:1]
        )

    def _eval(self, batch: dict, fn, shape: tuple) -> torch.Tensor:
        """`fn(logits, target)` of one micro-batch through the pipeline, from the last stage on every rank."""
        was = [m.training for m in self.stages]
        for m in self.stages:
            m.eval()
        self._eval_fn = fn
        try:
            losses = self._run(self.eval_schedule, [batch], train=False)
        finally:
            self._eval_fn = self._objective_loss
            for m, mode in zip(self.stages, was):
                m.train(mode)
        value = losses[0].detach().float().cpu() if self.has_last else torch.zeros(shape)
        return broadcast_from_last_stage(value, self.mesh)

    def _sum_tied_grads(self) -> None:
        """Embedding gradient (first stage) + output-layer gradient (last stage), on both."""
        if self.pair_group is None:
            return
        for m, s in zip(self.stages, self.stage_ids):
            # frozen under LoRA on both ends alike (the pair agrees on skipping the sum)
            if s in (0, self.n_stages - 1) and m.embed_in is not None and m.embed_in.weight.requires_grad:
                w = m.embed_in.weight
                if w.grad is None:  # a stage that saw no tokens still takes part in the sum
                    w.grad = torch.zeros_like(w)
                g = w.grad
                if hasattr(g, "placements") and tuple(g.placements) != tuple(w.placements):
                    # a vocab-parallel embedding's backward can leave its gradient replicated: give both ends
                    # the weight's own layout so their local shards line up
                    g = w.grad = g.redistribute(w.device_mesh, w.placements)
                local = g.to_local() if hasattr(g, "to_local") else g
                all_reduce_(local, self.pair_group)  # a CPU tensor under cpu_offload


def _shapes_known(schedule) -> bool:
    """Whether the schedule's one-time shape inference (its backward half calls the loss) is done. True where
    torch does not name the flag: the real loss is then used throughout."""
    for name in ("_stage_backward_initialized", "_stages_backward_initialized"):
        if hasattr(schedule, name):
            return bool(getattr(schedule, name))
    return True


def _drop_placeholder_routing_stats(stage: nn.Module) -> None:
    """The first training step runs each stage once on placeholder inputs (the schedule's shape inference)
    before any micro-batch: forget the routing statistics of that forward, which are not the run's."""
    layers = moe_layers(stage)
    if not layers:
        return

    def hook(module, args, out):
        if not module.training:
            return  # an evaluation forward: statistics are counted in training only
        for layer in layers:
            layer.stats = None
        handle.remove()

    handle = stage.register_forward_hook(hook)


# ---------------------------------------------------------------- putting it together


def split_for_rank(model: nn.Module, pcfg, mesh, n_micro: int, parallelize=None):
    """This rank's stages of `model` (a GPT, identical on every rank), each passed through `parallelize`
    (e.g. neox.parallel.apply for tp/dp). Returns (local_model, stages, stage_ids, n_stages, tied)."""
    pp, v = mesh["pp"].size(), pcfg.pipe_stages_per_rank
    validate(pcfg, len(model.layers), n_micro)
    n_stages = pp * v
    ranges = stage_ranges(model, n_stages, pcfg.pipe_partition_method)
    rank = mesh["pp"].get_local_rank()
    stage_ids = [rank + k * pp for k in range(v)]
    stages = [build_stage(model, s, n_stages, ranges[s]) for s in stage_ids]
    for m in stages:
        if parallelize is not None:
            parallelize(m)
        mark_tied_copy(m)
    tied = model.tied and model.embed_out is None
    return local_view(model, stages), stages, stage_ids, n_stages, tied


def build(
    model: nn.Module,
    pcfg,
    mesh,
    *,
    n_micro: int,
    precision,
    device: torch.device,
    parallelize=None,
    pass_positions: bool = False,
    pass_segments: bool = False,
    loss_fn=masked_mean_loss,
):
    """`split_for_rank` plus the runner: returns (local_model, runner). `local_model` is what the optimizer,
    clipping and checkpoints use; the full `model` should be dropped. `loss_fn` runs on the last stage, as a
    LocalRunner's (neox.parallel.runner.LossFn, taking the batch entries its `batch_keys` names)."""
    local, stages, stage_ids, n_stages, tied = split_for_rank(model, pcfg, mesh, n_micro, parallelize)
    runner = PipelineRunner(
        stages,
        stage_ids,
        n_stages,
        mesh,
        n_micro,
        pcfg.pipe_schedule,
        precision,
        device,
        tied,
        pass_positions=pass_positions,
        pass_segments=pass_segments,
        vocab_parallel=mesh["tp"].size() > 1,
        timeout=dist_timeout(pcfg),
        loss_fn=loss_fn,
    )
    return local, runner
