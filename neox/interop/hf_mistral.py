"""MistralForCausalLM: Llama blocks without biases, grouped-query attention and a sliding window.

transformers' `sliding_window` counts the keys a query sees, itself included (key k is visible from query q
when q - sliding_window < k <= q); neox's sliding_window_width (GPT-NeoX's key) counts the earlier tokens
besides the query itself, so sliding_window = sliding_window_width + 1.
"""

from __future__ import annotations

from neox.config.schema import ModelConfig
from neox.errors import NeoxError

MISTRAL = "MistralForCausalLM"


def mistral_checks(cfg: ModelConfig, gated_acts) -> tuple:
    """(option, value, expressible, why) for each option Mistral's blocks fix."""
    return (
        ("norm", cfg.norm, cfg.norm == "rmsnorm", "Mistral uses rmsnorm"),
        ("pos_emb", cfg.pos_emb, cfg.pos_emb == "rotary", "Mistral only has rotary position embeddings"),
        ("rotary_pct", cfg.rotary_pct, cfg.rotary_pct == 1.0, "Mistral rotates the whole head (1.0)"),
        ("activation", cfg.activation, cfg.activation in gated_acts, f"Mistral's MLP is gated: {sorted(gated_acts)}"),
        ("gpt_j_residual", cfg.gpt_j_residual, not cfg.gpt_j_residual, "Mistral blocks are sequential"),
        ("use_bias_in_attn_linear", True, not cfg.use_bias_in_attn_linear, "Mistral's attention has no biases"),
        ("use_bias_in_mlp", True, not cfg.use_bias_in_mlp, "Mistral's MLP has no biases"),
    )


def hf_sliding_window(cfg: ModelConfig) -> int | None:
    w = cfg.sliding_window_width
    return None if w is None else w + 1


def mistral_fields(hf) -> dict:
    """neox fields of a MistralConfig beyond the Llama-style ones (window; no attention or MLP biases)."""
    window = getattr(hf, "sliding_window", None)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise NeoxError(f"config.json: sliding_window={window!r} must be a positive integer or null")
    return {
        "sliding_window_width": None if window is None else window - 1,
        "use_bias_in_attn_linear": False,
        "use_bias_in_mlp": False,
    }
