"""Training diagnostics GPT-NeoX logs: per-parameter gradient and parameter norms (`log_grad_norm`,
`log_param_norm`) and the gradient noise scale (`log_gradient_noise_scale`).

Everything here stays on the device: the norms are computed on logging steps only and read with the rest of
the log line; the noise scale keeps its running sums as device tensors, so a step that does not log still
waits for nothing.

Norms are of the full tensors whatever the layout: a DTensor shard's sum of squares is summed over the mesh
dimensions it is sharded on (tensor parallel, FSDP), and pipeline stages, which hold different parameters,
fill their slots of one vector indexed by the whole model's parameter names, summed over "pp".
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from neox.config.schema import Config
from neox.model import GPT
from neox.parallel.comm import all_reduce_
from neox.parallel.reduce import TIED_COPY_ATTR, grad_norm


def full_parameter_names(cfg: Config) -> list[str]:
    """The whole model's parameter names in order (a pipeline stage holds some of them), from a meta GPT."""
    with torch.device("meta"):
        return [name for name, _ in GPT(cfg.model).named_parameters()]


def _squared(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().pow(2).sum()


def squared_norms(named: list[tuple[str, torch.Tensor]], names: list[str], mesh) -> torch.Tensor:
    """|t|^2 of each full tensor, as a vector indexed like `names` (0 where no rank holds that name)."""
    slot = {n: i for i, n in enumerate(names)}
    device = named[0][1].device if named else torch.device("cpu")
    if named and isinstance(named[0][1], DTensor):
        device = named[0][1].to_local().device
    total = torch.zeros(len(names), dtype=torch.float32, device=device)
    by_dims: dict = {}  # (device mesh, sharded dims) -> [(slot, local |t|^2)]
    for name, t in named:
        if isinstance(t, DTensor):
            if any(isinstance(p, Partial) for p in t.placements):
                t = t.redistribute(placements=[Replicate() if isinstance(p, Partial) else p for p in t.placements])
            dims = tuple(i for i, p in enumerate(t.placements) if isinstance(p, Shard))
            key, local = (t.device_mesh, dims), t.to_local()
        else:
            key, local = None, t
        by_dims.setdefault(key, []).append((slot[name], _squared(local).to(device)))
    for key, items in by_dims.items():
        part = torch.stack([v for _, v in items])
        if key is not None:
            dmesh, dims = key
            for d in dims:
                all_reduce_(part, dmesh.get_group(d))
        total[torch.tensor([i for i, _ in items], device=device)] = part
    if mesh is not None and mesh["pp"].size() > 1:
        all_reduce_(total, mesh["pp"].get_group())
    return total


def _counted(model: nn.Module, grads: bool) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, p in model.named_parameters():
        if getattr(p, TIED_COPY_ATTR, False):  # a pipeline's tied copy: counted once, on the first stage
            continue
        t = p.grad if grads else p
        if t is not None:
            out.append((name, t))
    return out


class _Held:
    """A gradient copy where `grad_norm` expects a parameter."""

    def __init__(self, grad: torch.Tensor, tied: bool):
        self.grad = grad
        setattr(self, TIED_COPY_ATTR, tied)


def _ema(avg, beta: float, value: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-NeoX's running mean and its bias-corrected value (corrected with the update count i)."""
    avg = beta * (0.0 if avg is None else avg) + (1 - beta) * value
    return avg, avg / (1 - beta ** (i + 1))


class GradientNoiseScale:
    """GPT-NeoX's estimate of the simple noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).

    Each step's gradient is the small batch (B_small = the global batch); the mean of n_batches consecutive
    steps' gradients stands in for the big batch (B_big = n_batches * B_small). Every n_batches-th update:
        |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)
    each smoothed by an exponential moving average (beta 0.99, bias-corrected with the update count as
    GPT-NeoX does), and the estimate is their ratio. The gradients are those the optimizer steps with (after
    clipping, as GPT-NeoX reads DeeperSpeed's stored gradients). A step whose big-batch norms are not finite
    leaves the averages as they were; fp16 steps skipped for overflow are not counted at all.
    """

    def __init__(self, batch_size_small: int, n_batches: int, cpu_offload: bool = False, beta: float = 0.99):
        self.b_small = batch_size_small
        self.b_big = batch_size_small * n_batches
        self.n_batches = n_batches
        self.cpu_offload = cpu_offload
        self.beta = beta
        self.buffer: list[torch.Tensor] | None = None
        self.ema_scale = self.ema_noise = None
        self.noise_scale: torch.Tensor | None = None  # 0-d, on the device; None until the first big batch
        self.n_updates = 0

    def _copy(self, g: torch.Tensor) -> torch.Tensor:
        return g.detach().to("cpu", torch.float32, copy=True) if self.cpu_offload else g.detach().float().clone()

    def update(self, model: nn.Module, mesh) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        tied = [bool(getattr(p, TIED_COPY_ATTR, False)) for p in params]
        if self.buffer is None:
            self.buffer = [self._copy(p.grad) for p in params]
        else:
            for held, p in zip(self.buffer, params):  # one by one: plain tensors and DTensors may be mixed
                held.add_(p.grad.detach().to(held.device, torch.float32))
        if self.n_updates % self.n_batches == self.n_batches - 1:
            for held in self.buffer:
                held.div_(self.n_batches)
            g_big = grad_norm([_Held(g, t) for g, t in zip(self.buffer, tied)], mesh) ** 2
            g_small = grad_norm(params, mesh) ** 2
            self.buffer = None
            self._fold(g_big, g_small.to(g_big.device))
        self.n_updates += 1

    def _fold(self, g_big: torch.Tensor, g_small: torch.Tensor) -> None:
        noise = (self.b_big * g_big - self.b_small * g_small) / (self.b_big - self.b_small)
        scale = (g_small - g_big) / (1 / self.b_small - 1 / self.b_big)
        finite = torch.isfinite(g_big) & torch.isfinite(g_small)
        ema_noise, noise = _ema(self.ema_noise, self.beta, noise, self.n_updates)
        ema_scale, scale = _ema(self.ema_scale, self.beta, scale, self.n_updates)
        if self.ema_noise is None:
            self.ema_noise, self.ema_scale = ema_noise, ema_scale
            self.noise_scale = torch.where(finite, scale / noise, torch.nan)
            return
        self.ema_noise = torch.where(finite, ema_noise, self.ema_noise)
        self.ema_scale = torch.where(finite, ema_scale, self.ema_scale)
        self.noise_scale = torch.where(finite, scale / noise, self.noise_scale)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same estimate (the partial big batch is not kept: a
        resumed run starts a new one, and counts on from the saved update count)."""
        return {
            "n_updates": self.n_updates - self.n_updates % self.n_batches,
            **{k: _host(getattr(self, k)) for k in ("ema_noise", "ema_scale", "noise_scale")},
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.n_updates = int(state["n_updates"])
        for key in ("ema_noise", "ema_scale", "noise_scale"):
            v = state.get(key)
            setattr(self, key, None if v is None else torch.tensor(v, dtype=torch.float32, device=device))


def _host(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t)  # checkpoint time, not a training step


class Diagnostics:
    """The diagnostics a config asks for. The trainer calls `after_clip(model, logging_step)` between clipping
    and the optimizer step, and `read()` at the log line for the values to add to it."""

    def __init__(self, cfg: Config, global_batch: int, mesh):
        lg = cfg.logging
        self.mesh = mesh
        self.grad_norms, self.param_norms = lg.log_grad_norm, lg.log_param_norm
        self.names = full_parameter_names(cfg) if self.grad_norms or self.param_norms else []
        self.noise = (
            GradientNoiseScale(global_batch, lg.gradient_noise_scale_n_batches, lg.gradient_noise_scale_cpu_offload)
            if lg.log_gradient_noise_scale
            else None
        )
        self._pending: dict[str, torch.Tensor] = {}

    @classmethod
    def wanted(cls, cfg: Config) -> bool:
        lg = cfg.logging
        return lg.log_grad_norm or lg.log_param_norm or lg.log_gradient_noise_scale

    def after_clip(self, model: nn.Module, logging_step: bool, skipped: bool = False) -> None:
        if self.noise is not None and not skipped:
            self.noise.update(model, self.mesh)
        if logging_step and self.grad_norms:
            self._pending["gradient_norms"] = squared_norms(_counted(model, True), self.names, self.mesh).sqrt()

    def before_log(self, model: nn.Module) -> None:
        """Parameter norms of the weights after the step (what the log line's iteration has)."""
        if self.param_norms:
            self._pending["parameter_norms"] = squared_norms(_counted(model, False), self.names, self.mesh).sqrt()

    def read(self) -> dict:
        """The log line's values: {"gradient_norms/NAME": float, ..., "noise_scale": float}; one host read."""
        parts = [(kind, v) for kind, v in self._pending.items()]
        if self.noise is not None and self.noise.noise_scale is not None:
            parts.append(("noise_scale", self.noise.noise_scale.reshape(1)))
        self._pending = {}
        if not parts:
            return {}
        values = torch.cat([v.float().to(parts[0][1].device) for _, v in parts]).tolist()
        out, at = {}, 0
        for kind, v in parts:
            if kind == "noise_scale":
                out[kind] = values[at]
            else:
                out.update({f"{kind}/{n}": x for n, x in zip(self.names, values[at : at + len(self.names)])})
            at += v.numel()
        return out
