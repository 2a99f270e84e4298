"""Maximal update parametrisation (muP, Yang et al., Tensor Programs V): what changes with model width.

A parameter dimension is width-like when its size differs from the base model's (model.mup_base_*), and its
width multiplier is size / base size; hyper-parameters tuned at the base width then carry over to wider
models. Per parameter (vector-like: one width-like dimension, matrix-like: two):
- init: matrix-like weights draw with std / sqrt(fan-in multiplier), every weight's std times mup_init_scale;
- Adam/AdamW: matrix-like learning rate / fan-in multiplier; SGD: vector-like lr * its multiplier,
  matrix-like lr * fan-out / fan-in multiplier (muP's MuAdam / MuSGD rules); weight decay is divided by the
  same factor, so that lr * weight_decay stays what it is at the base width;
- forward: attention scores q.k / (head_dim * mup_attn_temp) instead of / sqrt(head_dim), logits times
  1 / (mup_output_temp * width multiplier of the output layer's input), embeddings times mup_embedding_mult.

Every rule is a function of (config, parameter name, shape), so the initialisation (any parallel layout),
the optimizer's groups and the model agree without building the base model.
"""

from __future__ import annotations

import math

from neox.config.schema import ModelConfig
from neox.config.shapes import default_intermediate_size, head_dim, intermediate_size, mlp_width, num_kv_heads

# module-name segments that wrappers (DDP, torch.compile, activation checkpointing, FSDP1) insert
_WRAPPERS = {"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
_MLP_IN = ("w1", "w3", "dense_h_to_4h")
_MLP_OUT = ("w2", "dense_4h_to_h")


def base_hidden_size(cfg: ModelConfig) -> int:
    return cfg.mup_base_hidden_size or cfg.hidden_size


def base_heads(cfg: ModelConfig) -> int:
    return cfg.mup_base_num_attention_heads or cfg.num_attention_heads


def base_intermediate_size(cfg: ModelConfig) -> float:
    if cfg.mup_base_intermediate_size:
        return cfg.mup_base_intermediate_size
    if intermediate_size(cfg) == default_intermediate_size(cfg):
        return mlp_width(base_hidden_size(cfg), cfg.activation)
    return intermediate_size(cfg) * base_hidden_size(cfg) / cfg.hidden_size


def _widths(cfg: ModelConfig) -> dict[str, float]:
    """Width multiplier of each kind of dimension: hidden, MLP, qkv rows, heads, head_dim."""
    hb, nb = base_hidden_size(cfg), base_heads(cfg)
    kv, kvb = num_kv_heads(cfg), num_kv_heads(cfg) * nb / cfg.num_attention_heads
    hd, hdb = head_dim(cfg), hb / nb
    return {
        "hidden": cfg.hidden_size / hb,
        "mlp": intermediate_size(cfg) / base_intermediate_size(cfg),
        "qkv": (kv * hd) / (kvb * hdb),
        "heads": cfg.num_attention_heads / nb,
        "head_dim": hd / hdb,
        "fixed": 1.0,
    }


def _kinds(name: str, ndim: int) -> tuple[str, ...] | None:
    parts = [p for p in name.split(".") if p not in _WRAPPERS]
    module, leaf = parts[:-1], parts[-1]
    last = module[-1] if module else ""
    if last in ("embed_in", "embed_out", "embed_pos"):
        return ("fixed", "hidden")
    if last == "qk_layernorm":
        return ("head_dim",)
    if last == "relative_attention_bias":
        return ("fixed", "heads")
    if last.endswith("layernorm") or last == "final_layer_norm":
        return ("hidden",)
    pair = {
        "query_key_value": ("qkv", "hidden"),
        "dense": ("hidden", "hidden"),
        **dict.fromkeys(_MLP_IN, ("mlp", "hidden")),
        **dict.fromkeys(_MLP_OUT, ("hidden", "mlp")),
    }.get(last)
    if pair is None:
        return None
    return pair if leaf == "weight" and ndim == 2 else pair[:1]


def dim_multipliers(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> tuple[float, ...]:
    """Width multiplier of each dimension of parameter `name` (1 = not width-like). Parameters the GPT's
    names do not place (router and expert tensors of MoE layers) count a dimension of hidden_size as hidden."""
    w = _widths(cfg)
    kinds = _kinds(name, len(shape))
    if kinds is None or len(kinds) != len(shape):
        kinds = tuple("hidden" if d == cfg.hidden_size else "fixed" for d in shape)
    return tuple(w[k] for k in kinds)


def _infinite(mults: tuple[float, ...]) -> list[float]:
    return [m for m in mults if not math.isclose(m, 1.0)]


def init_multiplier(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> float:
    """Factor on the initial value of a weight drawn by the config's init method (1 without muP)."""
    if not cfg.use_mup:
        return 1.0
    mults = dim_multipliers(cfg, name, shape)
    fan_in = mults[1] if len(shape) == 2 and len(_infinite(mults)) == 2 else 1.0
    return cfg.mup_init_scale / math.sqrt(fan_in)


def lr_multiplier(cfg: ModelConfig, name: str, shape: tuple[int, ...], optimizer: str) -> float:
    """Factor on the learning rate of parameter `name` for optimizer type adam / adamw / sgd (1 without muP)."""
    if not cfg.use_mup:
        return 1.0
    mults = dim_multipliers(cfg, name, shape)
    inf = _infinite(mults)
    if optimizer == "sgd":
        if len(inf) == 1:
            return inf[0]
        if len(inf) == 2:
            return mults[0] / mults[1]
        return 1.0
    return 1.0 / mults[1] if len(inf) == 2 else 1.0


def query_scale(cfg: ModelConfig) -> float:
    """Factor on the queries that turns SDPA's 1/sqrt(head_dim) into muP's 1/(head_dim * mup_attn_temp)."""
    if not cfg.use_mup:
        return 1.0
    return 1.0 / (math.sqrt(head_dim(cfg)) * cfg.mup_attn_temp)


def output_multiplier(cfg: ModelConfig) -> float:
    """Factor on the logits (applied to the output layer's input, which has no bias)."""
    if not cfg.use_mup:
        return 1.0
    return 1.0 / (cfg.mup_output_temp * _widths(cfg)["hidden"])


def embedding_multiplier(cfg: ModelConfig) -> float:
    return cfg.mup_embedding_mult if cfg.use_mup else 1.0
