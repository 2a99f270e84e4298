"""Mixture of experts: a router sends each token to k of E expert MLPs and sums their outputs, weighted.

Parameter names (relative to a block whose MLP is an MoE layer, `layers.{i}.mlp.`):
    router.weight                       [E, H]      the routing logits' projection (no bias)
    experts.w1 / w3 / w2                [E, I, H] / [E, I, H] / [E, H, I]   (gated activations)
    experts.dense_h_to_4h / dense_4h_to_h  [E, I, H] / [E, H, I]            (non-gated)
    shared_experts.*                    a dense MLP of width moe_num_shared_experts * I that every token
                                        passes through (DeepSeek-style always-on experts)
Each expert weight is the stack of E nn.Linear weights ([out, in]), so expert e is `weight[e]`. Experts
carry no biases, like GPT-NeoX's dropless (megablocks) experts.

Routing (`route`): `topk` takes the k largest softmax probabilities; `sinkhorn` (GPT-NeoX's default, S-BASE)
picks the k experts of each token from the Sinkhorn-balanced assignment while training, weighting them by
the softmax (k > 1) or sigmoid (k = 1) of their logits, and routes by plain top-k at evaluation.

Dispatch is dropless by default: assignments are sorted by expert and the experts run as one grouped matmul
(`torch.nn.functional.grouped_mm`, offsets on the device, so no host sync) or, with `moe_dispatch: padded`,
as a batched matmul over [E, C, H] where C is the largest expert's load (one host read) or, with token
dropping, the capacity. On a CPU both pad each expert's rows to a multiple of CPU_ROW_ALIGN, so the matrix
shapes oneDNN sees repeat from step to step. With `moe_token_dropping`, each expert takes at most
C = max(ceil(capacity_factor * N * k / E), moe_min_capacity) assignments in priority order (all first
choices in token order, then all second choices, ... as in GShard); the rest are dropped (their weight is 0;
the token keeps its residual).

Auxiliary losses (Switch/GShard load balancing, ST-MoE router z-loss) do not go through the forward's output:
`_AttachAuxLoss` adds their gradient in the backward pass, so they train under every layout (pipeline
stages, activation checkpointing) without the loss function knowing about them. The runner's per-step
loss scaling is given to the layers with `set_aux_loss_scale`. Routing statistics accumulate on the device
and are read (and reset) by `read_stats`, at logging steps only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.schema import ModelConfig
from neox.config.shapes import is_moe_layer  # noqa: F401  (re-exported: the block asks here)
from neox.model.layers import ACTIVATION_FNS, MLP, intermediate_size, is_gated

# On a CPU every expert's rows are padded to a multiple of this (grouped and padded dispatch): oneDNN builds a
# kernel per matrix shape and caches it, so groups of any size built new ones every step (Xeon with AMX, the
# bench/moe.py shape, 1 thread: 2-11 ms per grouped matmul instead of ~1, and resident memory growing ~90 MB a
# step). 16 rows is an AMX tile's height.
CPU_ROW_ALIGN = 16
SINKHORN_TOL = 1e-4
# Sinkhorn iterations between convergence checks: each check reads one number back from the device.
SINKHORN_CHECK_EVERY = 8
SINKHORN_MAX_ITERS = 1000


# ---------------------------------------------------------------- routing


def sinkhorn(cost: torch.Tensor, tol: float = SINKHORN_TOL) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(cost) [N, E]: scale rows and columns until the columns are balanced (each row
    sums to 1/N, each column to 1/E), stopping when the column scales change by less than `tol` (mean abs)."""
    k = torch.exp(cost.float() - cost.float().max())  # shift: exp must not overflow; scales absorb it
    n, e = k.shape
    eps = 1e-8
    col = torch.ones(e, dtype=k.dtype, device=k.device)
    for i in range(SINKHORN_MAX_ITERS):
        row = 1.0 / (n * ((k * col).sum(1) + eps))
        new_col = 1.0 / (e * ((row[:, None] * k).sum(0) + eps))
        err = (new_col - col).abs().mean()
        col = new_col
        if (i + 1) % SINKHORN_CHECK_EVERY == 0 and float(err) <= tol:
            break
    return row[:, None] * k * col


def route(
    logits: torch.Tensor, k: int, router_type: str, training: bool, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, k], experts [N, k] int64, probs [N, E] fp32 softmax)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    if router_type == "sinkhorn":
        scores = torch.sigmoid(logits) if k == 1 else probs
        if training:
            with torch.no_grad():
                experts = torch.topk(sinkhorn(logits), k, dim=-1).indices
            weights = scores.gather(1, experts)
        else:
            weights, experts = torch.topk(scores, k, dim=-1)
    else:
        weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts, probs


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch / GShard: E * sum_e f_e * P_e, f_e = share of the N*k assignments that go to expert e,
    P_e = mean router probability of e over the N tokens. 1 when both are uniform."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / experts.numel()
    p = probs.mean(0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2 (keeps the router logits small)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def capacity(n_tokens: int, k: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """Assignments one expert takes when tokens are dropped (DeepSpeed/GShard's rule)."""
    return max(math.ceil(factor * n_tokens * k / num_experts), min_capacity)


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """experts [N, k] -> (order, counts, rank): `order` lists assignment ids (n*k + j) grouped by expert and,
    within an expert, in priority order (choice j first, then token n); counts [E]; rank [N*k] the position
    of each sorted assignment within its expert."""
    n, k = experts.shape
    priority = torch.arange(k, device=experts.device)[None, :] * n + torch.arange(n, device=experts.device)[:, None]
    key = experts * (n * k) + priority  # unique keys: a plain sort is deterministic
    order = torch.argsort(key.reshape(-1))
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = experts.reshape(-1)[order]
    rank = torch.arange(n * k, device=experts.device) - starts[sorted_experts]
    return order, counts, rank


# ---------------------------------------------------------------- experts


class Experts(nn.Module):
    """E MLPs stacked along a leading expert dimension, run over tokens already grouped by expert."""

    def __init__(self, cfg: ModelConfig, num_experts: int):
        super().__init__()
        h, inter = cfg.hidden_size, intermediate_size(cfg)
        self.num_experts = num_experts
        self.act = ACTIVATION_FNS[cfg.activation]
        self.gated = is_gated(cfg)
        names = ("w1", "w3", "w2") if self.gated else ("dense_h_to_4h", "dense_4h_to_h")
        self.weight_names = names
        shapes = {"w1": (inter, h), "w3": (inter, h), "w2": (h, inter)}
        shapes |= {"dense_h_to_4h": (inter, h), "dense_4h_to_h": (h, inter)}
        for name in names:
            # a usable value when built alone; a GPT re-initialises it by init_rules
            w = nn.init.normal_(torch.empty(num_experts, *shapes[name]), std=cfg.init_method_std)
            setattr(self, name, nn.Parameter(w))

    def init_rules(self) -> list[tuple[str, str]]:
        """(parameter name, init rule) for neox.model.init: the down projection writes into the residual."""
        if self.gated:
            return [("w1", "input"), ("w3", "input"), ("w2", "output")]
        return [("dense_h_to_4h", "input"), ("dense_4h_to_h", "output")]

    def _mlp(self, x: torch.Tensor, mm, weights: dict | None = None) -> torch.Tensor:
        dt = x.dtype
        w = weights if weights is not None else {n: getattr(self, n) for n in self.weight_names}
        if self.gated:
            h = self.act(mm(x, w["w1"].to(dt))) * mm(x, w["w3"].to(dt))
            return mm(h, w["w2"].to(dt))
        return mm(self.act(mm(x, w["dense_h_to_4h"].to(dt))), w["dense_4h_to_h"].to(dt))

    def grouped(self, x: torch.Tensor, counts: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        """x [M, H] sorted by expert, counts [E] -> [M, H], one grouped matmul per projection. `weights`
        (name -> [E', ...]) replace the parameters: an expert-parallel rank passes its local experts."""
        if not grouped_mm_supported(x):
            # one matmul per expert over its rows (reads the loads back once)
            sizes = counts.tolist()

            def per_expert(a, w):
                return torch.cat([part @ w[e].T for e, part in enumerate(a.split(sizes))])

            return self._mlp(x, per_expert, weights)
        if x.device.type == "cpu":
            return self._grouped_aligned(x, counts, weights, CPU_ROW_ALIGN)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return self._mlp(x, lambda a, w: F.grouped_mm(a, w.transpose(-2, -1), offs=offs), weights)

    def _grouped_aligned(self, x: torch.Tensor, counts: torch.Tensor, weights: dict | None, align: int):
        """grouped() with every expert's rows padded with zero rows to a multiple of `align` (no host read: the
        padded buffer has a fixed size, its slack going to the last expert)."""
        m, e = x.shape[0], counts.shape[0]
        rows = -(-(m + e * (align - 1)) // align) * align
        padded = (counts + align - 1) // align * align
        ends = torch.cumsum(padded, 0)
        starts = ends - padded
        ends[-1] = rows
        expert = torch.repeat_interleave(torch.arange(e, device=x.device), counts, output_size=m)
        rank = torch.arange(m, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]
        slot = starts[expert] + rank
        buf = x.new_zeros(rows, x.shape[1]).index_copy(0, slot, x)
        offs = ends.to(torch.int32)
        out = self._mlp(buf, lambda a, w: F.grouped_mm(a, w.transpose(-2, -1), offs=offs), weights)
        return out.index_select(0, slot)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, C, H] (rows beyond an expert's load are zero) -> [E, C, H], batched matmuls."""
        return self._mlp(x, lambda a, w: torch.bmm(a, w.transpose(-2, -1)))


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Where torch's grouped matmul runs: on the CPU in every dtype; on CUDA in bf16 from compute capability 8
    (torch.nn.functional.grouped_mm's documented inputs)."""
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return False


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out`; its backward also sends gradient `scale` into `aux` (a 0-d loss)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None


# stats slots after the E per-expert counts
_DROPPED, _AUX, _Z, _ENTROPY, _CALLS = range(5)


class MoE(nn.Module):
    """The MLP of an MoE block: router, E routed experts, optional shared experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.moe_num_experts
        self.num_experts, self.top_k = e, cfg.moe_top_k
        self.router_type = cfg.moe_router_type
        self.renormalize = cfg.moe_topk_renormalize
        self.jitter_eps = cfg.moe_jitter_eps
        self.lbl_in_fp32 = cfg.moe_lbl_in_fp32
        self.aux_coeff, self.z_coeff = cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff
        self.token_dropping = cfg.moe_token_dropping
        self.capacity_factors = (cfg.moe_train_capacity_factor, cfg.moe_eval_capacity_factor)
        self.min_capacity = cfg.moe_min_capacity
        self.dispatch = cfg.moe_dispatch
        self.gated = is_gated(cfg)
        self.router = nn.Linear(cfg.hidden_size, e, bias=False)
        self.experts = Experts(cfg, e)
        self.shared_experts = None
        if cfg.moe_num_shared_experts > 0:
            self.shared_experts = MLP(cfg, width=cfg.moe_num_shared_experts * intermediate_size(cfg), bias=False)
        # gradient scale of the aux losses (the runner's loss_scale / micro-batches), see set_aux_loss_scale
        self.aux_grad_scale = 1.0
        self.stats: torch.Tensor | None = None
        # how tokens reach the experts: `dispatch` here; expert parallelism (neox.parallel.expert) sets its own
        self.dispatcher = dispatch

    def capacity(self, n_tokens: int) -> int:
        factor = self.capacity_factors[0 if self.training else 1]
        return capacity(n_tokens, self.top_k, self.num_experts, factor, self.min_capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        router_in = flat
        if self.training and self.jitter_eps:
            noise = torch.empty_like(flat).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            router_in = flat * noise
        logits = self.router(router_in)
        weights, experts, probs = route(logits, self.top_k, self.router_type, self.training, self.renormalize)
        keep = None
        if self.token_dropping:
            keep = assignments_kept(experts, self.num_experts, self.capacity(flat.shape[0]))
        out = self.dispatcher(self.experts, flat, weights, experts, keep, self.dispatch, self.capacity(flat.shape[0]))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        out = out.reshape(shape)
        if self.training:
            out = self._aux_losses(out, logits, probs, experts, keep)
        return out

    def _aux_losses(self, out, logits, probs, experts, keep) -> torch.Tensor:
        lbl_probs = probs if self.lbl_in_fp32 else probs.to(logits.dtype)
        aux = load_balancing_loss(lbl_probs, experts, self.num_experts).float()
        z = router_z_loss(logits)
        if torch.is_grad_enabled() and (self.aux_coeff or self.z_coeff):
            total = self.aux_coeff * aux + self.z_coeff * z
            out = _AttachAuxLoss.apply(out, total, self.aux_grad_scale)
        if torch._C._current_graph_task_id() != -1:
            return out  # a recomputation inside the backward pass (activation checkpointing): counted already
        with torch.no_grad():
            counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).float()
            dropped = (keep.numel() - keep.sum()).float() if keep is not None else counts.new_zeros(())
            entropy = -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1).mean()
            row = torch.cat([counts, torch.stack([dropped, aux.detach(), z.detach(), entropy, counts.new_ones(())])])
            self.stats = row if self.stats is None else self.stats + row
        return out


def assignments_kept(experts: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """[N, k] bool: the assignments within their expert's capacity, in GShard's priority order."""
    order, _, rank = sort_by_expert(experts, num_experts)
    keep = torch.empty(experts.numel(), dtype=torch.bool, device=experts.device)
    keep[order] = rank < cap
    return keep.view(experts.shape)


def dispatch(
    experts_mod: Experts,
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    keep: torch.Tensor | None,
    how: str,
    cap: int,
) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) for each token n (dropped assignments add 0).
    x [N, H] -> [N, H] in x's dtype; the experts compute in the autocast dtype when autocast is on."""
    n, k = experts.shape
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    order, counts, rank = sort_by_expert(experts, experts_mod.num_experts)
    token = order // k
    w = weights.reshape(-1)
    if keep is not None:
        w = w * keep.reshape(-1)
    xs = x.index_select(0, token).to(dtype)  # index_select: its backward is index_add_, ~9x x[token]'s on a CPU
    if how == "padded":
        c = cap if keep is not None else int(counts.max())  # dropless: the largest load (one host read)
        if x.device.type == "cpu":
            c = -(-c // CPU_ROW_ALIGN) * CPU_ROW_ALIGN
        sorted_experts = experts.reshape(-1)[order]
        slot = torch.where(rank < c, sorted_experts * c + rank, experts_mod.num_experts * c)
        buf = xs.new_zeros(experts_mod.num_experts * c + 1, xs.shape[1]).index_copy(0, slot, xs)
        h = experts_mod.padded(buf[:-1].view(experts_mod.num_experts, c, -1)).reshape(-1, xs.shape[1])
        ys = torch.cat([h, h.new_zeros(1, h.shape[1])]).index_select(0, slot)
    else:
        ys = experts_mod.grouped(xs, counts)
    ys = ys * w.index_select(0, order)[:, None].to(ys.dtype)
    return torch.zeros(n, x.shape[1], dtype=ys.dtype, device=x.device).index_add_(0, token, ys).to(x.dtype)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Tell every MoE layer the factor the runner applies to this step's token loss (loss_scale divided by
    the micro-batches), so the aux losses' gradients are accumulated on the same footing."""
    for m in moe_layers(model):
        m.aux_grad_scale = scale


def read_stats(model: nn.Module) -> dict | None:
    """Routing statistics accumulated since the last call (training forwards of this rank), then reset;
    None for a model without MoE layers or before any forward. One device-to-host read."""
    rows = [m.stats for m in moe_layers(model) if m.stats is not None]
    if not rows:
        return None
    e = moe_layers(model)[0].num_experts
    total = torch.stack(rows).sum(0).cpu()
    for m in moe_layers(model):
        m.stats = None
    counts, extra = total[:e], total[e:]
    calls = max(float(extra[_CALLS]), 1.0)
    assignments = max(float(counts.sum()), 1.0)
    return {
        "moe/aux_loss": float(extra[_AUX]) / calls,
        "moe/z_loss": float(extra[_Z]) / calls,
        "moe/router_entropy": float(extra[_ENTROPY]) / calls,
        "moe/dropped_frac": float(extra[_DROPPED]) / assignments,
        "moe/max_load": float(counts.max()) / assignments * e,
        "moe/tokens_per_expert": [int(c) for c in counts.tolist()],
    }
