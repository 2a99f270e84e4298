"""GPT-NeoX initialisation (megatron/model/init_functions.py): `init_method` for input-side weights
(embeddings, qkv, MLP input projections, untied output layer, T5 bias table), `output_layer_init_method`
for the projections that write into the residual stream (attention dense, MLP down), zeros for biases,
ones for norm scales."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from neox.config.schema import ModelConfig

InitFn = Callable[[torch.Tensor], torch.Tensor]


def init_std(name: str, cfg: ModelConfig) -> float | None:
    """Standard deviation of the normal-type methods (None for xavier / orthogonal)."""
    sigma, layers, h = cfg.init_method_std, cfg.num_layers, cfg.hidden_size
    return {
        "normal": sigma,
        "scaled_normal": sigma / math.sqrt(2.0 * layers),
        "small_init": math.sqrt(2.0 / (5.0 * h)),  # Nguyen & Salazar, "Transformers without Tears"
        "wang_init": 2.0 / layers / math.sqrt(h),
    }.get(name)


def init_fn(name: str, cfg: ModelConfig) -> InitFn:
    std = init_std(name, cfg)
    if std is not None:
        return lambda t: nn.init.normal_(t, mean=0.0, std=std)
    if name == "xavier_uniform":
        return nn.init.xavier_uniform_
    if name == "xavier_normal":
        return nn.init.xavier_normal_
    if name == "orthogonal":
        # GPT-NeoX's "orthogonal" ends up with gain sqrt(2 / 1): its n_layers argument receives mup_m_width = 1
        return lambda t: _orthogonal(t, gain=math.sqrt(2.0))
    raise ValueError(f"unknown init method {name!r}")


def _orthogonal(t: torch.Tensor, gain: float) -> torch.Tensor:
    # QR has no bf16/fp16 kernel: factorise in fp32 and copy (GPT-NeoX patches its orthogonal init likewise)
    if t.dtype == torch.float32 or t.device.type == "meta":
        return nn.init.orthogonal_(t, gain=gain)
    return t.copy_(nn.init.orthogonal_(torch.empty(t.shape, device=t.device), gain=gain))


# Submodule names whose weight is a residual-stream output projection.
OUTPUT_LAYERS = ("attention.dense", "mlp.dense_4h_to_h", "mlp.w2")


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """(Re)initialise every parameter of a neox.model.GPT in place."""
    in_init = init_fn(cfg.init_method, cfg)
    out_init = init_fn(cfg.output_layer_init_method, cfg)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (out_init if name.endswith(OUTPUT_LAYERS) else in_init)(module.weight)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            in_init(module.weight)
        elif name.endswith("layernorm") or name.endswith("final_layer_norm"):
            for pname, p in module.named_parameters(recurse=False):
                p.fill_(1.0 if pname == "weight" else 0.0)
