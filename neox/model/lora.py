"""LoRA (Hu et al., 2021): a trainable low-rank term beside frozen nn.Linear weights.

For each targeted Linear, y = W x + b + (alpha / r) * B A dropout(x), with A [r, in] drawn at random (the
init rule of the layer's own weight, `neox.model.init`) and B [out, r] zeros, so training starts from the
base model exactly. A and B are registered on the Linear itself as ``lora_A`` / ``lora_B`` and the term is
added by a forward hook: the module tree and every base parameter name stay as they are, so a plain
checkpoint loads into the model and the state dict is the base one plus ``*.lora_A`` / ``*.lora_B`` keys.

Targets are named by the Linear's attribute name (the last part of its module path): ``query_key_value``,
``dense`` (attention output), ``dense_h_to_4h`` / ``dense_4h_to_h`` or ``w1`` / ``w2`` / ``w3`` (the MLP),
``embed_out``, ``router``. `merge_lora_` folds the term into W (W + scale * B @ A) and removes the adapters,
which is what inference and the Hugging Face export load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox.errors import ConfigError

ADAPTER_NAMES = ("lora_A", "lora_B")


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / state-dict key belongs to a LoRA adapter."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def _hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    if module.lora_dropout > 0.0:
        x = F.dropout(x, module.lora_dropout, module.training)
    a, b = module.lora_A, module.lora_B
    # autocast (or a bf16 model) gives the base output its dtype; the adapter follows it
    low = F.linear(x.to(a.dtype), a)
    return output + module.lora_scale * F.linear(low, b).to(output.dtype)


def targets(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Linear]]:
    """(module path, Linear) for every Linear whose attribute name is in `names`; a name that matches no
    Linear of this model is a ConfigError."""
    wanted = set(names)
    found = [
        (path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear) and path.split(".")[-1] in wanted
    ]
    hit = {path.split(".")[-1] for path, _ in found}
    missing = [n for n in names if n not in hit]
    if missing:
        have = sorted({p.split(".")[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"lora.target_modules: {', '.join(map(repr, missing))} names no linear layer of this model; "
            f"choose from {', '.join(have)}"
        )
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> list[str]:
    """Add adapters of `rank` to the targeted Linears of `model` (on whatever device its weights are, meta
    included: the initial values are `neox.model.init`'s) and freeze every other parameter; returns the
    adapted module paths."""
    found = targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in found:
        w = m.weight
        m.lora_A = nn.Parameter(torch.empty(rank, m.in_features, device=w.device, dtype=w.dtype))
        m.lora_B = nn.Parameter(torch.empty(m.out_features, rank, device=w.device, dtype=w.dtype))
        m.lora_scale = alpha / rank
        m.lora_dropout = float(dropout)
        m.lora_handle = m.register_forward_hook(_hook)
        if not w.is_meta:
            reset_adapter(m)
    return [path for path, _ in found]


@torch.no_grad()
def reset_adapter(m: nn.Linear) -> None:
    """A as PEFT draws it (Kaiming-uniform, a = sqrt(5), as nn.Linear's own weight), B zeros: for models
    built in code on a real device; the trainer's meta-device build draws A with neox.model.init instead."""
    nn.init.kaiming_uniform_(m.lora_A, a=5**0.5)
    nn.init.zeros_(m.lora_B)


def adapted(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of every adapted layer: nn.Linear, or a 4-bit one (neox.model.qlora) before merging."""
    return [(path, m) for path, m in model.named_modules() if hasattr(m, "lora_A")]


def move_adapter(src: nn.Module, dst: nn.Module) -> None:
    """Re-home `src`'s adapter (parameters, scale, dropout, hook) on `dst`, which replaces it in the model
    (neox.model.qlora swaps a Linear for its 4-bit form and back); a no-op for a layer without one."""
    if not hasattr(src, "lora_A"):
        return
    src.lora_handle.remove()
    for name in (*ADAPTER_NAMES, "lora_scale", "lora_dropout"):
        setattr(dst, name, getattr(src, name))
        delattr(src, name)
    dst.lora_handle = dst.register_forward_hook(_hook)
    del src.lora_handle


@torch.no_grad()
def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into its nn.Linear's weight (W += scale * B @ A, in fp32) and remove it; returns
    how many. 4-bit layers are turned back into nn.Linear first (neox.model.qlora.dequantize_base_)."""
    done = adapted(model)
    for _, m in done:
        delta = m.lora_scale * (m.lora_B.float() @ m.lora_A.float())
        m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
        m.lora_handle.remove()
        for name in (*ADAPTER_NAMES, "lora_scale", "lora_dropout", "lora_handle"):
            delattr(m, name)
    return len(done)
