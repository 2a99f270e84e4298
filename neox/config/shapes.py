"""The model's shapes as the config implies them, where a field left unset has a derived value.

Both the loader (filling derived defaults) and the model (building layers, counting parameters) read the
shapes from here, so the two always agree. No torch: `neox model info` answers for a 20B model at once.
"""

from __future__ import annotations

import math

from neox.config.schema import GATED_ACTIVATIONS, ModelConfig

GATED_MULTIPLE_OF = 256


def is_gated(cfg: ModelConfig) -> bool:
    return cfg.activation in GATED_ACTIVATIONS


def mlp_width(
    hidden_size: int, activation: str, expansion_factor: float | None = None, multiple_of: int | None = None
) -> int:
    """MLP width when `intermediate_size` is unset: 4*hidden; gated activations keep the parameter count of a
    4*hidden MLP with three matrices (8/3*hidden) rounded up to a multiple of 256, as GPT-NeoX's LLaMA MLP.

    GPT-NeoX's knobs: `expansion_factor` replaces the 4 (8/3 when gated), `multiple_of` (mlp_multiple_of)
    replaces the rounding, which is 256 only for a gated MLP at the default expansion and none otherwise.
    """
    gated = activation in GATED_ACTIVATIONS
    if expansion_factor is not None:
        width = int(expansion_factor * hidden_size)
    elif gated:
        width = int(2 * 4 * hidden_size / 3)
    else:
        width = 4 * hidden_size
    multiple = multiple_of or (GATED_MULTIPLE_OF if gated and expansion_factor is None else 1)
    return multiple * math.ceil(width / multiple)


def default_intermediate_size(cfg: ModelConfig) -> int:
    return mlp_width(cfg.hidden_size, cfg.activation)


def intermediate_size(cfg: ModelConfig) -> int:
    return cfg.intermediate_size if cfg.intermediate_size is not None else default_intermediate_size(cfg)


def num_kv_heads(cfg: ModelConfig) -> int:
    return cfg.num_kv_heads if cfg.num_kv_heads is not None else cfg.num_attention_heads


def max_positions(cfg: ModelConfig) -> int:
    return cfg.max_position_embeddings if cfg.max_position_embeddings is not None else cfg.seq_length


def head_dim(cfg: ModelConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def rotary_dims(cfg: ModelConfig) -> int:
    """How many of each head's dimensions rotary embeddings rotate."""
    return int(head_dim(cfg) * cfg.rotary_pct)


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """GPT-NeoX's rule: block i has an MoE MLP when i % moe_expert_interval == 0 (and there are experts)."""
    return cfg.moe_num_experts > 1 and layer_idx % cfg.moe_expert_interval == 0
