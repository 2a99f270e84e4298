"""The optimizers GPT-NeoX offers beyond Adam and SGD (Lion, SM3, MADGRAD with decoupled decay), Adafactor, and
Muon as it is used in practice (Newton-Schulz-orthogonalised momentum for hidden matrices, AdamW for everything else).

Each keeps its whole state per parameter (a `step` tensor included), never in optimizer-wide fields, so
distributed checkpoints (DCP) can save, shard and reshard it like Adam's. The updates are written with plain
tensor ops, which DTensor runs on sharded parameters (FSDP, tensor parallelism) with the same result as on
whole ones: every update here is elementwise except SM3's row/column maxima, Adafactor's row/column means
and RMS, and Muon's matrix products, which DTensor reduces across shards.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim import Optimizer


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), decoupled weight decay:

    c = b1 * m + (1 - b1) * g;  p <- p * (1 - lr * wd) - lr * sign(c);  m <- b2 * m + (1 - b2) * g
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = torch.lerp(p.grad, m, b1).sign_()  # b1 * m + (1 - b1) * g
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                m.lerp_(p.grad, 1 - b2)
                state["step"] += 1
        return loss


class SM3(Optimizer):
    """SM3-II (Anil et al. 2019, "Memory-Efficient Adaptive Optimization"), as GPT-NeoX configures it.

    A rank-r parameter keeps r accumulators, one per axis (shapes (n1, 1, ..), (1, n2, ..), ...): memory grows
    with the sum of its dimensions, not their product. Each step, per element,
        nu = beta * min over axes of acc_axis + (1 - beta) * g^2   (beta = 0: the paper's sum of squares)
        acc_axis <- max of nu over every other axis (beta > 0: and at least its old value)
        p <- p - lr * g / sqrt(nu + eps)   (momentum > 0: the update is an average with the previous one)
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, beta: float = 0.0, eps: float = 1e-30):
        if not 0.0 <= momentum < 1.0 or not 0.0 <= beta < 1.0:
            raise ValueError(f"SM3 needs 0 <= momentum < 1 and 0 <= beta < 1, got {momentum}, {beta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "beta": beta, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group in self.param_groups:
            beta, momentum, eps = group["beta"], group["momentum"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                axes = max(g.dim(), 1)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for i in range(axes):
                        state[f"accumulator_{i}"] = _reduce_max_except(torch.zeros_like(g), i)
                    if momentum > 0.0:
                        state["momentum_buffer"] = torch.zeros_like(g)
                accs = [state[f"accumulator_{i}"] for i in range(axes)]
                nu = accs[0]
                for acc in accs[1:]:
                    nu = torch.minimum(nu, acc)  # broadcasts to the parameter's shape
                nu = nu * beta + g * g * (1.0 - beta) if beta > 0.0 else nu + g * g
                for i, acc in enumerate(accs):
                    row = _reduce_max_except(nu, i)
                    acc.copy_(torch.maximum(acc, row) if beta > 0.0 else row)
                update = g * torch.rsqrt(nu + eps)
                if momentum > 0.0:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(update, alpha=1.0 - momentum)
                    update = buf
                p.add_(update, alpha=-group["lr"])
                state["step"] += 1
        return loss


def _reduce_max_except(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Max over every dimension but `axis`, dimensions kept (a scalar stays a scalar)."""
    for d in range(t.dim()):
        if d != axis:
            t = t.amax(dim=d, keepdim=True)
    return _settled(t)


def _settled(t: torch.Tensor) -> torch.Tensor:
    """A DTensor reduced over a sharded dimension comes out Partial: each rank holds its shard's maximum, not
    the value. DCP refuses to save a Partial tensor (SM3's column maxima of a row-sharded weight, its row
    maxima of a column-sharded one), so the reduction is completed here: Replicate on those mesh dimensions,
    which DCP saves and reshards to any layout (a vector per axis: small next to the parameter)."""
    if isinstance(t, DTensor) and any(p.is_partial() for p in t.placements):
        return t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
    return t


class MADGRAD(Optimizer):
    """MADGRAD (Defazio & Jelassi 2021) with decoupled weight decay (GPT-NeoX's `madgrad_wd`). At step k (from 0):

    lam = lr * sqrt(k + 1);  s <- s + lam * g;  v <- v + lam * g^2;  z = x0 - s / (v^(1/3) + eps)
    p <- (1 - c) * p + c * z with c = 1 - momentum (momentum 0: p = z); weight decay first: p <- p * (1 - lr * wd)
    x0 is the initial parameter (kept as state when momentum > 0, recovered from p, s and v otherwise).
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0, eps: float = 1e-6):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MADGRAD momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group in self.param_groups:
            lr, eps, momentum, wd = group["lr"], group["eps"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["grad_sum_sq"] = torch.zeros_like(p)
                    state["s"] = torch.zeros_like(p)
                    if momentum > 0.0:
                        state["x0"] = p.detach().clone()
                k = float(state["step"])
                lam = lr * (k + 1) ** 0.5
                v, s = state["grad_sum_sq"], state["s"]
                if wd:
                    p.mul_(1 - lr * wd)
                x0 = state["x0"] if momentum > 0.0 else p + s / (v.pow(1 / 3) + eps)
                v.addcmul_(g, g, value=lam)
                s.add_(g, alpha=lam)
                z = x0 - s / (v.pow(1 / 3) + eps)
                if momentum > 0.0:
                    p.lerp_(z, 1.0 - momentum)
                else:
                    p.copy_(z)
                state["step"] += 1
        return loss


class Adafactor(Optimizer):
    """Adafactor (Shazeer & Stern 2018) with torch.optim.Adafactor's defaults and definitions, written without
    host reads (torch's reads two scalars per parameter per step) and with out-of-place reductions, so it runs
    on sharded DTensor parameters. At step t, for a matrix gradient g [.., R, C]:

    r <- lerp(r, mean_C(g^2), t^decay);  c <- lerp(c, mean_R(g^2), t^decay);  v = r c / max(mean_R(r), eps1)
    u = g / sqrt(max(v, eps1^2));  alpha = max(eps2, RMS(p)) * min(lr, 1/sqrt(t))
    p <- p * (1 - lr * wd) - alpha * u / max(1, RMS(u) / d)       (vectors keep an unfactored v = lerp(v, g^2))
    """

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps=(None, 1e-3), d: float = 1.0):
        super().__init__(params, {"lr": lr, "beta2_decay": beta2_decay, "eps": tuple(eps), "d": d, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for group in self.param_groups:
            lr, decay, d, wd = group["lr"], group["beta2_decay"], group["d"], group["weight_decay"]
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                e1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if g.dim() > 1:
                        state["row_var"] = g.new_zeros(g.shape[:-1] + (1,))
                        state["col_var"] = g.new_zeros(g.shape[:-2] + (1, g.shape[-1]))
                    else:
                        state["variance"] = torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])  # a CPU tensor: no device read
                weight = t**decay
                alpha = torch.clamp(p.square().mean().sqrt(), min=eps2) * min(lr, t**-0.5)
                if wd:
                    p.mul_(1 - lr * wd)
                if g.dim() > 1:
                    row, col = state["row_var"], state["col_var"]
                    row.lerp_(g.square().mean(dim=-1, keepdim=True), weight)
                    col.lerp_(g.square().mean(dim=-2, keepdim=True), weight)
                    v = (row @ col) / torch.clamp(row.mean(dim=-2, keepdim=True), min=e1)
                else:
                    state["variance"].lerp_(g.square(), weight)
                    v = state["variance"]
                u = g * torch.rsqrt(torch.clamp(v, min=e1 * e1))
                denom = torch.clamp(u.square().mean().sqrt() / d, min=1.0)
                p.sub_(u * (alpha / denom))
        return loss


class MuonWithAdamW(Optimizer):
    """torch.optim.Muon for the groups marked `muon: True` (2-D hidden matrices) and torch.optim.AdamW for the
    rest (embeddings, output head, norms, biases), as one optimizer: one set of param_groups for the schedule,
    one state for checkpoints. The two inner optimizers share this one's state and group dicts."""

    def __init__(self, groups: list[dict], adamw: dict, muon: dict):
        super().__init__(groups, {})
        self._adamw_args, self._muon_args = adamw, muon
        self._link()
        self.register_load_state_dict_post_hook(lambda opt: opt._link())

    def _link(self) -> None:
        muon = [g for g in self.param_groups if g["muon"]]
        rest = [g for g in self.param_groups if not g["muon"]]
        self._inner = []
        for chosen, cls, args in (
            (muon, torch.optim.Muon, self._muon_args),
            (rest, torch.optim.AdamW, self._adamw_args),
        ):
            if not chosen:
                continue
            # built over copies (the constructor fills in its defaults), then pointed at the real groups and state
            inner = cls([dict(g) for g in chosen], **args)
            for mine, built in zip(chosen, inner.param_groups, strict=True):
                for key, value in built.items():
                    mine.setdefault(key, value)
            inner.param_groups = chosen
            inner.state = self.state
            self._inner.append(inner)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure(closure)
        for inner in self._inner:
            inner.step()
        return loss


def _closure(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
