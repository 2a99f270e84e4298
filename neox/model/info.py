"""Model arithmetic from the config alone (no torch import): parameter count, FLOPs per token and per-rank
memory estimates. The shapes they start from (MLP width, heads, positions) come from neox.config.shapes, which the
config loader also fills its derived defaults from."""

from __future__ import annotations

import math

from neox.config.schema import ModelConfig
from neox.config.shapes import (
    head_dim,
    intermediate_size,
    is_gated,
    is_moe_layer,
    max_positions,
    num_kv_heads,
    rotary_dims,
)
from neox.errors import ConfigError


def check_shapes(cfg: ModelConfig) -> None:
    """Raise a ConfigError naming the key when the head layout cannot be built."""
    heads, kv = cfg.num_attention_heads, num_kv_heads(cfg)
    if cfg.vocab_size is None:
        raise ConfigError(
            "model.vocab_size is not set: resolve it from the tokenizer (neox.config.resolve_vocab) "
            "or set model.vocab_size"
        )
    if heads <= 0 or cfg.hidden_size % heads:
        raise ConfigError(
            f"model.hidden_size={cfg.hidden_size} must be a positive multiple of model.num_attention_heads={heads}"
        )
    if kv <= 0 or heads % kv:
        raise ConfigError(f"model.num_attention_heads={heads} must be a multiple of model.num_kv_heads={kv}")
    if cfg.pos_emb == "rotary":
        rd = rotary_dims(cfg)
        if rd <= 0 or rd % 2:
            raise ConfigError(
                f"model.rotary_pct={cfg.rotary_pct} gives {rd} rotary dims of head_dim "
                f"{head_dim(cfg)}; it must be a positive even number"
            )
    if cfg.pos_emb == "rpe" and cfg.rpe_max_distance <= cfg.rpe_num_buckets // 2:
        raise ConfigError(
            f"model.rpe_max_distance={cfg.rpe_max_distance} must exceed half of "
            f"model.rpe_num_buckets={cfg.rpe_num_buckets}"
        )


def _norm_params(cfg: ModelConfig) -> int:
    if cfg.norm == "scalenorm":
        return 1
    return cfg.hidden_size * (2 if cfg.use_bias_in_norms else 1)


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    h, hd, heads, kv = cfg.hidden_size, head_dim(cfg), cfg.num_attention_heads, num_kv_heads(cfg)
    qkv_out = (heads + 2 * kv) * hd
    attn = h * qkv_out + heads * hd * h + (qkv_out + h if cfg.use_bias_in_attn_linear else 0)
    if cfg.pos_emb == "rpe":
        attn += cfg.rpe_num_buckets * heads
    norms = 1 if (cfg.gpt_j_residual and cfg.gpt_j_tied) else 2
    return attn + _mlp_params(cfg, intermediate_size(cfg), cfg.use_bias_in_mlp) + norms * _norm_params(cfg)


def _mlp_params(cfg: ModelConfig, inter: int, bias: bool) -> int:
    h = cfg.hidden_size
    if is_gated(cfg):
        return 3 * h * inter + (2 * inter + h if bias else 0)
    return 2 * h * inter + (inter + h if bias else 0)


def moe_mlp_params(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters of one MoE MLP (router, experts without biases, shared experts); `active`: only those a
    token runs through (its top-k experts)."""
    inter = intermediate_size(cfg)
    experts = cfg.moe_top_k if active else cfg.moe_num_experts
    shared = _mlp_params(cfg, cfg.moe_num_shared_experts * inter, False) if cfg.moe_num_shared_experts else 0
    return cfg.hidden_size * cfg.moe_num_experts + experts * _mlp_params(cfg, inter, False) + shared


def block_params(cfg: ModelConfig, layer_idx: int, active: bool = False) -> int:
    """Parameters of block `layer_idx` (an MoE block counts its experts, or with `active` its top-k)."""
    dense = layer_params(cfg)
    if not is_moe_layer(cfg, layer_idx):
        return dense
    return dense - _mlp_params(cfg, intermediate_size(cfg), cfg.use_bias_in_mlp) + moe_mlp_params(cfg, active)


def blocks_params(cfg: ModelConfig, active: bool = False) -> int:
    return sum(block_params(cfg, i, active) for i in range(cfg.num_layers))


def num_params(cfg: ModelConfig) -> int:
    """Total trainable parameters of neox.model.GPT(cfg) (a tied output layer is counted once)."""
    check_shapes(cfg)
    h, v = cfg.hidden_size, cfg.vocab_size
    total = v * h + blocks_params(cfg) + _norm_params(cfg)
    if cfg.pos_emb == "learned":
        total += max_positions(cfg) * h
    if cfg.no_weight_tying:
        total += v * h
    return total


def num_active_params(cfg: ModelConfig) -> int:
    """Parameters one token's forward pass uses: num_params less the experts the router did not pick."""
    return num_params(cfg) - blocks_params(cfg) + blocks_params(cfg, active=True)


def flops_per_token(cfg: ModelConfig, seq_length: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * L * H * T (PaLM appendix B).

    N_matmul counts the parameters that take part in matrix multiplies: every block parameter (of an MoE
    block: the router, the k experts a token is routed to and the shared experts, i.e. the active FLOPs) plus
    the output projection (V*H, tied or not); the embedding lookup costs no FLOPs. The attention term is the
    score and weighted-sum matmuls over a full (not causally halved) T x T, the usual convention for MFU.
    """
    check_shapes(cfg)
    t = seq_length if seq_length is not None else cfg.seq_length
    n_matmul = blocks_params(cfg, active=True) + cfg.vocab_size * cfg.hidden_size
    attn_width = cfg.num_attention_heads * head_dim(cfg)
    return 6 * n_matmul + 12 * cfg.num_layers * attn_width * t


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def memory_per_rank(
    cfg: ModelConfig,
    *,
    precision: str = "fp32",
    bf16_mode: str = "autocast",
    optimizer: str = "adamw",
    micro_batch: int = 1,
    seq_length: int | None = None,
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    zero_stage: int = 0,
    checkpoint_activations: bool = False,
) -> dict[str, int]:
    """Estimated bytes held per rank during training: params, grads, optimizer states, activations.

    Params are divided by tp and pp (the embedding and head live on the first/last stage, so this is the
    average stage); ZeRO 1 shards optimizer states over dp, 2 also grads, 3 also params. Master weights are
    fp32 except for pure bf16. Activations follow Korthikanti et al. 2022 for SDPA attention (no stored score
    matrix): 34*s*b*h bytes per layer at 16-bit (x2 at fp32), divided by tp (sequence parallel assumed),
    or only each block's input (plus one block's full set) when activations are checkpointed, plus logits;
    with pipelining, times the pp micro-batches a 1F1B first stage holds.
    """
    n = num_params(cfg)
    s = seq_length if seq_length is not None else cfg.seq_length
    weight_bytes = 2 if (precision == "bf16" and bf16_mode == "pure") else 4
    states_per_param = {"adam": 2, "adamw": 2, "sgd": 1}.get(optimizer, 2)  # Adam m and v; SGD momentum
    shard_params = n / (tp * pp)
    params = shard_params * weight_bytes / (dp if zero_stage >= 3 else 1)
    grads = shard_params * weight_bytes / (dp if zero_stage >= 2 else 1)
    optim = shard_params * states_per_param * weight_bytes / (dp if zero_stage >= 1 else 1)

    act_bytes = BYTES.get(precision, 4)
    layers_here = math.ceil(cfg.num_layers / pp)
    # 1F1B's first stage keeps the activations of pp micro-batches alive before its first backward
    sbh = s * micro_batch * cfg.hidden_size * pp
    if checkpoint_activations:
        acts = layers_here * sbh * act_bytes / tp + 34 * sbh / pp * (act_bytes / 2) / tp
    else:
        acts = layers_here * 34 * sbh * (act_bytes / 2) / tp
    # logits in the activation dtype plus the fp32 copy the loss works on (last stage)
    acts += s * micro_batch * cfg.vocab_size * (act_bytes + 4) / tp
    out = {"params": params, "grads": grads, "optimizer": optim, "activations": acts}
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out
