"""Optimizer construction: weight-decay (and muP learning-rate) parameter groups and the choice of optimizer."""

from __future__ import annotations

import functools

import torch
from torch import nn

from neox.config.schema import ModelConfig, OptimizerConfig
from neox.errors import ConfigError
from neox.kernels.bnb import load_bitsandbytes
from neox.model.mup import lr_multiplier
from neox.train.optimizers import MADGRAD, SM3, Adafactor, Lion, MuonWithAdamW


def no_decay(name: str, param: torch.Tensor) -> bool:
    """GPT-NeoX exempts biases and normalisation weights from weight decay.

    Every norm weight and every bias is a vector (ScaleNorm's gain is a scalar), while every matrix
    (projections, embeddings, relative-position tables) is decayed, so the rank decides; the name check
    catches a bias stored with an extra dimension. Working from rank and name rather than module classes
    keeps this correct after FSDP/TP wrapping, which renames modules but keeps parameter shapes' rank.
    """
    return param.ndim < 2 or name.endswith("bias")


def param_groups(
    model: nn.Module, weight_decay: float, mcfg: ModelConfig | None = None, kind: str = "adamw"
) -> list[dict]:
    """Decayed matrices and undecayed vectors; frozen parameters are left out. With muP (mcfg.use_mup) each
    of the two splits further by learning-rate multiplier (`lr_scale`, which the schedule applies), and a
    decayed group's weight decay is divided by its multiplier, so lr * weight_decay keeps its base value."""
    buckets: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = lr_multiplier(mcfg, name, tuple(p.shape), kind) if mcfg is not None else 1.0
        buckets.setdefault((not no_decay(name, p), scale), []).append(p)
    groups = []
    for (decay, scale), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        name = "decay" if decay else "no_decay"
        groups.append(
            {
                "params": params,
                "weight_decay": weight_decay / scale if decay else 0.0,
                "lr_scale": scale,
                "name": name if scale == 1.0 else f"{name}_lr_x{scale:g}",
            }
        )
    return groups


def _implementation(params: list[torch.Tensor]) -> dict:
    """The fastest exact update kernel for these parameters.

    The fused CPU/CUDA Adam kernels do one pass over each tensor instead of ~10 elementwise passes; plain
    (non-DTensor) tensors on one device type are what they require, so sharded or meta parameters fall back
    to the multi-tensor `foreach` path.
    """
    devices = {p.device.type for p in params}
    plain = all(type(p) is nn.Parameter or type(p) is torch.Tensor for p in params)
    if plain and len(devices) == 1 and devices <= {"cpu", "cuda"}:
        return {"fused": True}
    # foreach kernels cannot mix plain tensors with DTensors, nor DTensors on different meshes (tensor
    # parallelism without sequence parallelism; FSDP + TP): those take the per-tensor path
    meshes = {getattr(p, "device_mesh", None) for p in params}
    return {"foreach": len(meshes) == 1}


def _keep_kernels(optimizer: torch.optim.Optimizer, impl: dict) -> None:
    # load_state_dict restores the saving run's fused/foreach flags with the hyper-parameters; this run's
    # parameters decide them (a checkpoint from one process may resume under tensor parallelism)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = impl.get("fused", False), impl.get("foreach", False)


OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "sm3", "madgrad_wd", "adafactor", "muon")


def muon_eligible(name: str, param: torch.Tensor) -> bool:
    """Muon orthogonalises hidden matrices only: 2-D weights that are neither the token/position embeddings
    nor the output head (those, the norms, the biases and 3-D expert banks take AdamW, as Muon is used)."""
    leaf = name.split(".")
    return param.ndim == 2 and not any(part.startswith("embed") for part in leaf)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, mcfg: ModelConfig | None = None) -> torch.optim.Optimizer:
    """The optimizer named by cfg.type over `param_groups(model, cfg.weight_decay, mcfg)` (mcfg: the model's
    config, for muP's per-group learning rates).

    `adam` adds weight decay to the gradient (torch.optim.Adam, L2); `adamw` decays the weights directly
    (decoupled, what GPT-NeoX's FusedAdam does by default); lion, sm3 and madgrad_wd are GPT-NeoX's others;
    adafactor is torch.optim.Adafactor's algorithm without its host reads; muon is torch.optim.Muon on hidden matrices with AdamW for the rest.
    The learning rate is set by the schedule.
    """
    kind = cfg.type.lower()
    groups = param_groups(model, cfg.weight_decay, mcfg, kind)
    if not groups:
        raise ConfigError("model has no trainable parameters; nothing to optimize")
    params = [p for g in groups for p in g["params"]]
    if kind in ("adam", "adamw", "lion", "muon") and len(cfg.betas) != 2:
        raise ConfigError(f"optimizer.betas must be two numbers, got {cfg.betas!r}")
    betas = tuple(float(b) for b in cfg.betas)
    if cfg.use_bnb_optimizer:
        return _bnb_optimizer(kind, groups, params, cfg, betas)
    if kind in ("adam", "adamw"):
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        impl = _implementation(params)
        opt = cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **impl)
        opt.register_load_state_dict_post_hook(functools.partial(_keep_kernels, impl=impl))
        return opt
    if kind == "sgd":
        # the multi-tensor path where the parameters allow it (not a mix of plain tensors and DTensors)
        found = _implementation(params)
        impl = {"foreach": found.get("fused", False) or found.get("foreach", False)}
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **impl)
        opt.register_load_state_dict_post_hook(functools.partial(_keep_kernels, impl=impl))
        return opt
    if kind == "lion":
        return Lion(groups, lr=cfg.lr, betas=betas)
    if kind == "sm3":
        return SM3(groups, lr=cfg.lr, momentum=cfg.momentum, beta=cfg.beta, eps=cfg.eps)
    if kind == "madgrad_wd":
        return MADGRAD(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps)
    if kind == "adafactor":
        return Adafactor(groups, lr=cfg.lr)
    if kind == "muon":
        return MuonWithAdamW(
            _muon_groups(model, groups),
            adamw={"lr": cfg.lr, "betas": betas, "eps": cfg.eps, "foreach": False},
            # one learning rate for both halves: Muon's update is rescaled to AdamW's typical RMS (0.2 sqrt(max dim))
            muon={"lr": cfg.lr, "momentum": betas[0], "adjust_lr_fn": "match_rms_adamw"},
        )
    raise ConfigError(f"optimizer.type: unknown optimizer {cfg.type!r}; use one of {', '.join(OPTIMIZERS)}")


def _bnb_optimizer(kind: str, groups: list[dict], params: list[torch.Tensor], cfg: OptimizerConfig, betas):
    """bitsandbytes' 8-bit Adam/AdamW (block-wise quantised moments) over the same parameter groups."""
    if kind not in ("adam", "adamw"):
        raise ConfigError(f"optimizer.use_bnb_optimizer: 8-bit state exists for adam and adamw, not {kind!r}")
    bitsandbytes = load_bitsandbytes()  # optional, imported on first use (neox.kernels.bnb: offline)
    if bitsandbytes is None:
        raise ConfigError(
            "optimizer.use_bnb_optimizer is true but bitsandbytes is not installed: pip install bitsandbytes"
        )
    if any(type(p) is not nn.Parameter and type(p) is not torch.Tensor for p in params):
        raise ConfigError(
            "optimizer.use_bnb_optimizer: bitsandbytes quantises whole tensors; it cannot run on sharded (ZeRO-3 / "
            "tensor-parallel) parameters: use zero_stage 0 and no model_parallel_size, or turn it off"
        )
    cls = bitsandbytes.optim.AdamW8bit if kind == "adamw" else bitsandbytes.optim.Adam8bit
    return cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


def _muon_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Each group split into its Muon-eligible matrices (`muon: True`) and the rest."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        for flag in (True, False):
            chosen = [p for p in g["params"] if muon_eligible(names[id(p)], p) == flag]
            if chosen:
                out.append({**g, "params": chosen, "muon": flag, "name": g["name"] + ("_muon" if flag else "")})
    return out
