"""RoPE scaling between neox's model.rope_scaling and transformers' rope_parameters / rope_scaling.

transformers keeps the scaling method beside rope_theta (5.x: `rope_parameters`, 4.x: `rope_scaling`); the
parameters carry over by name. One difference: transformers' dynamic NTK starts rescaling past the model's
max_position_embeddings, neox's past rope_scaling.original_max_position_embeddings (neox's own
max_position_embeddings is the length of its position tables), so that length moves between the two fields.
"""

from __future__ import annotations

from neox.config.rope import ROPE_SCALING_TYPES, parse_rope_scaling
from neox.config.schema import ModelConfig
from neox.errors import NeoxError
from neox.model.info import max_positions


def rope_scaling(cfg: ModelConfig):
    return parse_rope_scaling(cfg.rope_scaling, max_positions(cfg))


def rope_parameters(cfg: ModelConfig, partial: bool = False) -> dict:
    """transformers 5.x `rope_parameters` of `cfg` (partial: GPTNeoX's partial_rotary_factor too)."""
    scaling = rope_scaling(cfg)
    out = scaling.as_dict() if scaling is not None else {"rope_type": "default"}
    if scaling is not None and scaling.type == "dynamic":
        out.pop("original_max_position_embeddings")  # transformers reads max_position_embeddings instead
    out["rope_theta"] = float(cfg.rotary_emb_base)
    if partial:
        out["partial_rotary_factor"] = float(cfg.rotary_pct)
    return out


def hf_max_positions(cfg: ModelConfig) -> int:
    """config.json's max_position_embeddings: for dynamic NTK the length where rescaling starts."""
    scaling = rope_scaling(cfg)
    if scaling is not None and scaling.type == "dynamic":
        return scaling.original_max_position_embeddings
    return max_positions(cfg)


def legacy_rope_scaling(cfg: ModelConfig) -> dict:
    """The 4.x `rope_scaling` key (both `type` and `rope_type`, as 4.x versions read one or the other)."""
    params = {k: v for k, v in rope_parameters(cfg).items() if k not in ("rope_theta", "partial_rotary_factor")}
    if params["rope_type"] == "default":
        return {}
    return {"rope_scaling": {"type": params["rope_type"], **params}}


def rope_fields(hf, rope: dict) -> dict:
    """neox model fields for the rope_parameters of a transformers config (empty without scaling)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind not in ROPE_SCALING_TYPES:
        raise NeoxError(
            f"config.json: rope_type={kind!r} (RoPE scaling) has no neox equivalent; "
            f"neox has {', '.join(ROPE_SCALING_TYPES)}"
        )
    keys = {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast"}
    keys |= {"beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}
    scaling = {"type": kind, **{k: v for k, v in rope.items() if k in keys and v is not None}}
    if kind == "linear":
        scaling = {"type": kind, "factor": scaling.get("factor")}
    if kind == "dynamic":
        scaling["original_max_position_embeddings"] = hf.max_position_embeddings
        # neox needs position tables as long as the longest context: the factor's stretch of the original
        return {"rope_scaling": scaling, "max_position_embeddings": int(hf.max_position_embeddings * scaling["factor"])}
    if kind in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
    if kind == "yarn":
        scaling = {k: v for k, v in scaling.items() if k not in ("low_freq_factor", "high_freq_factor")}
    if kind == "llama3":
        scaling = {
            k: v
            for k, v in scaling.items()
            if k in ("type", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
        }
    try:
        parse_rope_scaling(scaling, hf.max_position_embeddings)
    except ValueError as e:
        raise NeoxError(f"config.json: rope_parameters: {e}") from None
    return {"rope_scaling": scaling}
