"""Config and weight mapping between neox and Hugging Face GPTNeoXForCausalLM / LlamaForCausalLM /
MistralForCausalLM / MixtralForCausalLM.

Pure functions on dicts and tensors (no files), so they are easy to test and both directions stay in one place.
neox parameter names are HF GPTNeoX's minus the `gpt_neox.` prefix (docs/architecture.md), so GPTNeoX is a
rename; Llama (and Mistral, whose weights are named as Llama's) needs the fused, kv-grouped qkv split into
q/k/v; Mixtral also the stacked expert weights split per expert (and, on import, transformers 5's fused
gate_up_proj split into w1 / w3). RoPE scaling is mapped in hf_rope.py, Mistral's window in hf_mistral.py.
"""

from __future__ import annotations

import torch

from neox.config.schema import GATED_ACTIVATIONS, ModelConfig
from neox.errors import NeoxError
from neox.interop.hf_mistral import MISTRAL, hf_sliding_window, mistral_checks, mistral_fields
from neox.interop.hf_rope import hf_max_positions, legacy_rope_scaling, rope_fields, rope_parameters
from neox.model.info import intermediate_size

GPTNEOX = "GPTNeoXForCausalLM"
LLAMA = "LlamaForCausalLM"
MIXTRAL = "MixtralForCausalLM"

# neox activation -> HF hidden_act (ungated MLP, GPTNeoX)
_NEOX_ACT = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "mish": "mish"}
# neox gated activation -> HF hidden_act of LlamaMLP's gate
_LLAMA_ACT = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


class ExportError(NeoxError):
    """The config uses an option the target HF architecture cannot express."""


def _refuse(arch: str, option: str, value, why: str) -> ExportError:
    return ExportError(f"model.{option}={value!r} cannot be exported to {arch}: {why}")


def hf_architecture(cfg: ModelConfig) -> str:
    """Which HF class expresses this config; raises ExportError naming the first option it cannot express."""
    for option, value, why in _no_hf_equivalent(cfg):
        raise _refuse("transformers", option, value, why)
    if cfg.moe_num_experts > 1:
        return _mixtral_architecture(cfg)
    if cfg.sliding_window_width is not None:
        return _mistral_architecture(cfg)
    arch = LLAMA if cfg.norm == "rmsnorm" else GPTNEOX
    if cfg.pos_emb != "rotary":
        raise _refuse(arch, "pos_emb", cfg.pos_emb, "HF GPTNeoX and Llama only have rotary position embeddings")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise _refuse(arch, "hidden_size", cfg.hidden_size, "must be divisible by num_attention_heads")
    if arch == LLAMA:
        if cfg.activation not in _LLAMA_ACT:
            raise _refuse(arch, "activation", cfg.activation, f"Llama's MLP is gated: use one of {sorted(_LLAMA_ACT)}")
        if cfg.gpt_j_residual:
            raise _refuse(arch, "gpt_j_residual", True, "Llama blocks are sequential (use norm: layernorm for GPTNeoX)")
        if cfg.rotary_pct != 1.0:
            raise _refuse(arch, "rotary_pct", cfg.rotary_pct, "Llama rotates the whole head (1.0)")
        return arch
    if cfg.norm != "layernorm":
        raise _refuse(arch, "norm", cfg.norm, "GPTNeoX uses layernorm, Llama rmsnorm")
    if cfg.activation not in _NEOX_ACT:
        hint = " (gated MLPs export to Llama, which needs norm: rmsnorm)" if cfg.activation in GATED_ACTIVATIONS else ""
        raise _refuse(arch, "activation", cfg.activation, f"GPTNeoX's MLP supports {sorted(_NEOX_ACT)}{hint}")
    kv = cfg.num_kv_heads or cfg.num_attention_heads
    if kv != cfg.num_attention_heads:
        raise _refuse(arch, "num_kv_heads", kv, "GPTNeoX has no grouped-query attention (Llama-style configs do)")
    return arch


def _no_hf_equivalent(cfg: ModelConfig) -> list[tuple[str, object, str]]:
    """(option, value, why) for the neox options none of the exported architectures has."""
    rows = [
        ("use_mup", cfg.use_mup, "transformers' models have no muP multipliers (attention 1/d, logits, embeddings)"),
        ("use_qk_layernorm", cfg.use_qk_layernorm, "GPTNeoX, Llama and Mistral have no QK layernorm"),
        (
            "attention_types",
            cfg.attention_types,
            any(t != "global" for t in cfg.attention_types or ()),
            "the exported models attend globally in every layer (a sliding window exports to Mistral)",
        ),
    ]
    return [(o, v, why) for o, v, *bad, why in rows if (bad[0] if bad else v)]


def _mistral_architecture(cfg: ModelConfig) -> str:
    for option, value, ok, why in mistral_checks(cfg, _LLAMA_ACT):
        if not ok:
            raise _refuse(MISTRAL, option, value, why)
    return MISTRAL


def _mixtral_architecture(cfg: ModelConfig) -> str:
    """MoE configs export as Mixtral: Llama blocks whose every MLP is top-k softmax routing over gated experts,
    the k weights renormalised, dropless; each option it cannot express is refused by name."""
    arch = MIXTRAL
    checks = (
        ("norm", cfg.norm, cfg.norm == "rmsnorm", "Mixtral uses rmsnorm"),
        ("pos_emb", cfg.pos_emb, cfg.pos_emb == "rotary", "Mixtral only has rotary position embeddings"),
        ("rotary_pct", cfg.rotary_pct, cfg.rotary_pct == 1.0, "Mixtral rotates the whole head (1.0)"),
        (
            "activation",
            cfg.activation,
            cfg.activation in _LLAMA_ACT,
            f"Mixtral's experts are gated: {sorted(_LLAMA_ACT)}",
        ),
        ("gpt_j_residual", cfg.gpt_j_residual, not cfg.gpt_j_residual, "Mixtral blocks are sequential"),
        ("use_bias_in_attn_linear", True, not cfg.use_bias_in_attn_linear, "Mixtral's attention has no biases"),
        ("use_bias_in_norms", True, not cfg.use_bias_in_norms, "Mixtral's RMSNorm has no bias"),
        ("moe_expert_interval", cfg.moe_expert_interval, cfg.moe_expert_interval == 1, "every Mixtral MLP is MoE"),
        ("moe_router_type", cfg.moe_router_type, cfg.moe_router_type == "topk", "Mixtral routes by top-k softmax"),
        (
            "moe_topk_renormalize",
            cfg.moe_topk_renormalize,
            cfg.moe_topk_renormalize,
            "Mixtral divides the k routing weights by their sum (set moe_topk_renormalize: true)",
        ),
        ("moe_token_dropping", True, not cfg.moe_token_dropping, "Mixtral's experts are dropless"),
        ("moe_num_shared_experts", cfg.moe_num_shared_experts, cfg.moe_num_shared_experts == 0, "Mixtral has none"),
        (
            "sliding_window_width",
            getattr(cfg, "sliding_window_width", None),
            getattr(cfg, "sliding_window_width", None) is None,
            "not exported to Mixtral's sliding_window",
        ),
    )
    for option, value, ok, why in checks:
        if not ok:
            raise _refuse(arch, option, value, why)
    return arch


def to_hf_config(
    cfg: ModelConfig,
    eos_id: int | None = None,
    bos_id: int | None = None,
    pad_id: int | None = None,
    dtype: str = "float32",
):
    """A transformers config object for `cfg` (GPTNeoXConfig or LlamaConfig)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig

    arch = hf_architecture(cfg)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=intermediate_size(cfg),
        max_position_embeddings=hf_max_positions(cfg),
        initializer_range=cfg.init_method_std,
        tie_word_embeddings=not cfg.no_weight_tying,
        attention_bias=cfg.use_bias_in_attn_linear,
        attention_dropout=cfg.attention_dropout,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=[arch],
        dtype=dtype,
    )
    if arch == MIXTRAL:
        common.pop("attention_bias")
        return MixtralConfig(
            **common,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_attention_heads,
            hidden_act=_LLAMA_ACT[cfg.activation],
            rms_norm_eps=cfg.rms_norm_epsilon,
            rope_parameters=rope_parameters(cfg),
            num_local_experts=cfg.moe_num_experts,
            num_experts_per_tok=cfg.moe_top_k,
            # transformers' balancing loss sums f over the k choices, k times neox's f
            router_aux_loss_coef=cfg.moe_aux_loss_coeff / cfg.moe_top_k,
            router_jitter_noise=0.0,
        )
    if arch == MISTRAL:
        common.pop("attention_bias")
        return MistralConfig(
            **common,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_attention_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            hidden_act=_LLAMA_ACT[cfg.activation],
            rms_norm_eps=cfg.rms_norm_epsilon,
            rope_parameters=rope_parameters(cfg),
            sliding_window=hf_sliding_window(cfg),
        )
    if arch == LLAMA:
        return LlamaConfig(
            **common,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_attention_heads,
            hidden_act=_LLAMA_ACT[cfg.activation],
            rms_norm_eps=cfg.rms_norm_epsilon,
            mlp_bias=cfg.use_bias_in_mlp,
            rope_parameters=rope_parameters(cfg),
        )
    return GPTNeoXConfig(
        **common,
        hidden_act=_NEOX_ACT[cfg.activation],
        layer_norm_eps=cfg.layernorm_epsilon,
        use_parallel_residual=cfg.gpt_j_residual,
        hidden_dropout=cfg.hidden_dropout,
        rope_parameters=rope_parameters(cfg, partial=True),
    )


def legacy_config_keys(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json keys that transformers 4.x reads where 5.x reads `rope_parameters` and `dtype`. Written
    beside them (5.x takes them only as fallbacks), so 4.x builds the same rotary embedding: without them
    GPTNeoX there falls back to rotary_pct=0.25."""
    rope = {"rope_theta": float(cfg.rotary_emb_base)}
    if hf_architecture(cfg) == GPTNEOX:
        rope = {"rotary_pct": float(cfg.rotary_pct), "rotary_emb_base": float(cfg.rotary_emb_base)}
    if hf_architecture(cfg) == MISTRAL:
        rope["sliding_window"] = hf_sliding_window(cfg)
    return {**rope, **legacy_rope_scaling(cfg), "torch_dtype": dtype}


def from_hf_config(hf) -> dict:
    """neox `model` group (a dict of ModelConfig fields) for a transformers GPTNeoX or Llama config object."""
    arch = (getattr(hf, "architectures", None) or [""])[0]
    model_type = getattr(hf, "model_type", "")
    if model_type not in ("gpt_neox", "llama", "mixtral", "mistral") and arch not in (GPTNEOX, LLAMA, MIXTRAL, MISTRAL):
        # before reading any field: other architectures lack some of them (GPT-2 has no intermediate_size)
        raise NeoxError(
            f"config.json: model_type={model_type!r} / architectures={arch!r} is not supported; "
            f"import handles {GPTNEOX}, {LLAMA}, {MISTRAL} and {MIXTRAL}"
        )
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = rope_fields(hf, rope)
    base = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        seq_length=min(hf.max_position_embeddings, 2048),
        intermediate_size=hf.intermediate_size,
        pos_emb="rotary",
        rotary_emb_base=_int_if_whole(rope.get("rope_theta", 10000)),
        no_weight_tying=not getattr(hf, "tie_word_embeddings", False),
        use_bias_in_attn_linear=bool(getattr(hf, "attention_bias", False)),
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf, "initializer_range", 0.02)),
    )
    base.update(scaling)  # dynamic NTK also lengthens max_position_embeddings
    if model_type == "gpt_neox" or arch == GPTNEOX:
        act = {v: k for k, v in _NEOX_ACT.items() if k != "swish"}.get(hf.hidden_act)
        if act is None:
            raise NeoxError(
                f"config.json: hidden_act={hf.hidden_act!r} has no neox equivalent; "
                f"supported: {sorted(set(_NEOX_ACT.values()))}"
            )
        return {
            **base,
            "norm": "layernorm",
            "layernorm_epsilon": hf.layer_norm_eps,
            "activation": act,
            "rotary_pct": float(rope.get("partial_rotary_factor", 1.0)),
            "gpt_j_residual": bool(hf.use_parallel_residual),
            "use_bias_in_mlp": True,
            "use_bias_in_norms": True,
            "hidden_dropout": float(getattr(hf, "hidden_dropout", 0.0) or 0.0),
        }
    if model_type == "mixtral" or arch == MIXTRAL:
        return {**base, **_llama_fields(hf, rope), **_mixtral_fields(hf)}
    if model_type == "mistral" or arch == MISTRAL:
        return {**base, **_llama_fields(hf, rope), **mistral_fields(hf)}
    if model_type == "llama" or arch == LLAMA:
        return {**base, **_llama_fields(hf, rope)}
    raise AssertionError("unreachable: the architecture was checked above")


def _mixtral_fields(hf) -> dict:
    if float(getattr(hf, "router_jitter_noise", 0.0) or 0.0):
        raise NeoxError(
            "config.json: router_jitter_noise != 0 cannot import: Mixtral's jitter scales the experts' input too, "
            "neox's moe_jitter_eps only the router's"
        )
    if getattr(hf, "sliding_window", None) is not None:
        raise NeoxError("config.json: sliding_window is set; Mixtral's sliding window does not import into neox")
    k = hf.num_experts_per_tok
    return {
        "moe_num_experts": hf.num_local_experts,
        "moe_top_k": k,
        "moe_router_type": "topk",
        "moe_topk_renormalize": True,
        "moe_aux_loss_coeff": float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0) * k,
        "use_bias_in_mlp": False,
    }


def _llama_fields(hf, rope: dict) -> dict:
    """The neox fields of a Llama-style block (Llama, Mixtral's attention and norms)."""
    act = {v: k for k, v in _LLAMA_ACT.items()}.get(hf.hidden_act)
    if act is None:
        raise NeoxError(
            f"config.json: hidden_act={hf.hidden_act!r} has no neox gated equivalent; "
            f"supported: {sorted(_LLAMA_ACT.values())}"
        )
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise NeoxError(
            f"config.json: head_dim={head_dim} * num_attention_heads != hidden_size; "
            "neox models need head_dim = hidden_size / num_attention_heads"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NeoxError("config.json: partial_rotary_factor != 1 is not Llama's rotary; cannot import")
    return {
        "norm": "rmsnorm",
        "rms_norm_epsilon": hf.rms_norm_eps,
        "activation": act,
        "num_kv_heads": hf.num_key_value_heads or hf.num_attention_heads,
        "rotary_pct": 1.0,
        "gpt_j_residual": False,
        "use_bias_in_mlp": bool(getattr(hf, "mlp_bias", False)),
        "use_bias_in_norms": False,
    }


def _int_if_whole(x):
    return int(x) if float(x).is_integer() else float(x)


def _heads(cfg: ModelConfig) -> tuple[int, int, int]:
    """(kv heads, query heads per kv head, head_dim)."""
    kv = cfg.num_kv_heads or cfg.num_attention_heads
    return kv, cfg.num_attention_heads // kv, cfg.hidden_size // cfg.num_attention_heads


def _split_qkv(t: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """neox fused qkv (rows per kv group: q_0..q_{g-1}, k, v) -> Llama's q, k, v (weight or bias)."""
    kv, g, hd = _heads(cfg)
    grouped = t.reshape(kv, g + 2, hd, *t.shape[1:])
    q = grouped[:, :g].reshape(kv * g * hd, *t.shape[1:])
    k = grouped[:, g].reshape(kv * hd, *t.shape[1:])
    v = grouped[:, g + 1].reshape(kv * hd, *t.shape[1:])
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    kv, g, hd = _heads(cfg)
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(kv, g, hd, *rest), k.reshape(kv, 1, hd, *rest), v.reshape(kv, 1, hd, *rest)], 1)
    return grouped.reshape(kv * (g + 2) * hd, *rest)


_LLAMA_LAYER = {  # neox name inside a layer -> Llama name inside a layer (besides qkv)
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.dense.bias": "self_attn.o_proj.bias",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w1.bias": "mlp.gate_proj.bias",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w3.bias": "mlp.up_proj.bias",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "mlp.w2.bias": "mlp.down_proj.bias",
}
_LLAMA_TOP = {
    "embed_in.weight": "model.embed_tokens.weight",
    "final_layer_norm.weight": "model.norm.weight",
    "embed_out.weight": "lm_head.weight",
}


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """neox state dict -> HF state dict (tied output weight omitted: HF re-ties it at load)."""
    arch = hf_architecture(cfg)
    sd = {k: v.detach() for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    if arch == GPTNEOX:
        _complete_gptneox(cfg, sd)
        for k, v in sd.items():
            # the head keeps Pythia's name: transformers 4.x has `embed_out`, 5.x maps it to `lm_head`
            out[k if k == "embed_out.weight" else f"gpt_neox.{k}"] = v
    else:
        for k, v in sd.items():
            if k in _LLAMA_TOP:
                out[_LLAMA_TOP[k]] = v
                continue
            _, i, rest = k.split(".", 2) if k.startswith("layers.") else (None, None, k)
            if i is None:
                raise ExportError(f"weight {k!r} has no {LLAMA} equivalent")
            prefix = f"model.layers.{i}."
            if rest.startswith("attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip("qkv", _split_qkv(v, cfg)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part
            elif rest in _LLAMA_LAYER:
                out[prefix + _LLAMA_LAYER[rest]] = v
            elif arch == MIXTRAL and rest == "mlp.router.weight":
                out[prefix + "block_sparse_moe.gate.weight"] = v
            elif arch == MIXTRAL and rest in ("mlp.experts.w1", "mlp.experts.w3", "mlp.experts.w2"):
                # transformers 4.x's per-expert layout, which 5.x also loads (fusing w1/w3 into gate_up_proj)
                for e in range(v.shape[0]):
                    out[f"{prefix}block_sparse_moe.experts.{e}.{rest[-2:]}.weight"] = v[e]
            elif rest.endswith("layernorm.bias") and not v.any():
                continue  # an all-zero norm bias changes nothing; RMSNorm in HF has none
            else:
                raise ExportError(f"weight {k!r} has no {LLAMA} equivalent (check model.use_bias_in_norms)")
    return {k: v.contiguous() for k, v in out.items()}


def _complete_gptneox(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> None:
    """Fill what HF GPTNeoX always has but a neox config may omit, with values that change nothing."""
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if p + "post_attention_layernorm.weight" not in sd:  # gpt_j_tied: one norm feeds both branches
            sd[p + "post_attention_layernorm.weight"] = sd[p + "input_layernorm.weight"].clone()
            if p + "input_layernorm.bias" in sd:
                sd[p + "post_attention_layernorm.bias"] = sd[p + "input_layernorm.bias"].clone()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd.setdefault(f"{p}{norm}.bias", torch.zeros_like(sd[f"{p}{norm}.weight"]))
        for lin in ("dense_h_to_4h", "dense_4h_to_h"):
            w = sd[f"{p}mlp.{lin}.weight"]
            sd.setdefault(f"{p}mlp.{lin}.bias", w.new_zeros(w.shape[0]))
    sd.setdefault("final_layer_norm.bias", torch.zeros_like(sd["final_layer_norm.weight"]))


def _from_mixtral_moe(out: dict, experts: dict, i: str, rest: str, v: torch.Tensor) -> bool:
    """One Mixtral MoE weight of layer i into `out` (or, per expert, into `experts`); False if it is none.
    Both layouts: 4.x's block_sparse_moe.experts.{e}.w1/w3/w2 and 5.x's fused mlp.experts.gate_up_proj."""
    if rest in ("block_sparse_moe.gate.weight", "mlp.gate.weight"):
        out[f"layers.{i}.mlp.router.weight"] = v
    elif rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate (w1) rows, then up (w3)
        w1, w3 = v.chunk(2, dim=1)
        out[f"layers.{i}.mlp.experts.w1"], out[f"layers.{i}.mlp.experts.w3"] = w1.contiguous(), w3.contiguous()
    elif rest == "mlp.experts.down_proj":
        out[f"layers.{i}.mlp.experts.w2"] = v
    elif rest.startswith("block_sparse_moe.experts.") and rest.endswith(("w1.weight", "w2.weight", "w3.weight")):
        _, _, e, w, _ = rest.split(".")
        experts.setdefault((i, w), {})[int(e)] = v
    else:
        return False
    return True


def from_hf_state_dict(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPTNeoX / Llama / Mixtral state dict -> neox state dict for a config made by from_hf_config."""
    out: dict[str, torch.Tensor] = {}
    if cfg.norm == "layernorm":
        for k, v in hf_sd.items():
            if k.endswith((".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")):
                continue  # buffers old Pythia checkpoints carry
            if k in ("lm_head.weight", "embed_out.weight"):
                out["embed_out.weight"] = v
            elif k.startswith("gpt_neox."):
                out[k[len("gpt_neox.") :]] = v
            else:
                raise NeoxError(f"weight {k!r} is not a GPTNeoXForCausalLM weight")
    else:
        top = {v: k for k, v in _LLAMA_TOP.items()}
        layer = {v: k for k, v in _LLAMA_LAYER.items()}
        arch = MIXTRAL if cfg.moe_num_experts > 1 else LLAMA
        qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for k, v in hf_sd.items():
            if k.endswith("rotary_emb.inv_freq"):
                continue
            if k in top:
                out[top[k]] = v
                continue
            if not k.startswith("model.layers."):
                raise NeoxError(f"weight {k!r} is not a {arch} weight")
            _, _, i, rest = k.split(".", 3)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                proj, kind = rest.split(".")[1:]
                qkv.setdefault((i, kind), {})[proj[0]] = v
            elif rest in layer:
                out[f"layers.{i}.{layer[rest]}"] = v
            elif arch == MIXTRAL and _from_mixtral_moe(out, experts, i, rest, v):
                continue
            else:
                raise NeoxError(f"weight {k!r} is not a {arch} weight")
        for (i, w), per_expert in experts.items():
            if sorted(per_expert) != list(range(cfg.moe_num_experts)):
                raise NeoxError(
                    f"layer {i}: expert {w} weights for {sorted(per_expert)}, not all {cfg.moe_num_experts}"
                )
            out[f"layers.{i}.mlp.experts.{w}"] = torch.stack([per_expert[e] for e in range(cfg.moe_num_experts)])
        for (i, kind), parts in qkv.items():
            out[f"layers.{i}.attention.query_key_value.{kind}"] = _fuse_qkv(parts["q"], parts["k"], parts["v"], cfg)
    if not cfg.no_weight_tying:
        out.pop("embed_out.weight", None)
    return out
