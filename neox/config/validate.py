"""Derived defaults and the rules that involve more than one field.

Errors name the file and key that set the offending value (`Resolved.where`), so that with several config
files and `--set` overrides the user knows which line to change.
"""

from __future__ import annotations

import math
import re

from neox.config.attention import (
    BLOCK_SPARSE,
    check_sparsity_keys,
    check_sparsity_params,
    expand_attention_config,
    sparsity_params,
)
from neox.config.fields import Resolved
from neox.config.rope import parse_rope_scaling
from neox.config.schema import Config
from neox.config.shapes import head_dim, max_positions, mlp_width, num_kv_heads, rotary_dims
from neox.errors import ConfigError


def derive(cfg: Config, mlp_multiple_of: int | None = None, expansion_factor: float | None = None) -> None:
    m = cfg.model
    m.max_position_embeddings = max_positions(m)
    m.num_kv_heads = num_kv_heads(m)
    if m.intermediate_size is None:
        m.intermediate_size = mlp_width(m.hidden_size, m.activation, expansion_factor, mlp_multiple_of)


# (group, field, smallest allowed value) for values that must be positive / non-negative.
_AT_LEAST = [
    ("model", "num_layers", 1),
    ("model", "hidden_size", 1),
    ("model", "num_attention_heads", 1),
    ("model", "num_kv_heads", 1),
    ("model", "seq_length", 1),
    ("model", "max_position_embeddings", 1),
    ("model", "vocab_size", 1),
    ("model", "make_vocab_size_divisible_by", 1),
    ("model", "intermediate_size", 1),
    ("model", "rotary_emb_base", 1),
    ("model", "rpe_num_buckets", 1),
    ("model", "rpe_max_distance", 1),
    ("model", "layernorm_epsilon", 0),
    ("model", "rms_norm_epsilon", 0),
    ("model", "init_method_std", 0),
    ("train", "train_iters", 0),
    ("train", "train_micro_batch_size_per_gpu", 1),
    ("train", "gradient_accumulation_steps", 1),
    ("train", "train_batch_size", 1),
    ("train", "gradient_clipping", 0),
    ("train", "checkpoint_num_layers", 1),
    ("train", "curriculum_difficulty_step", 1),
    ("train", "curriculum_total_steps", 1),
    ("train", "loss_spike_window", 0),
    ("train", "max_rollbacks", 0),
    ("logging", "gradient_noise_scale_n_batches", 2),
    ("data", "num_workers", 0),
    ("data", "weighted_sampler_alpha", 0),
    ("optimizer", "lr", 0),
    ("optimizer", "eps", 0),
    ("optimizer", "weight_decay", 0),
    ("optimizer", "momentum", 0),
    ("schedule", "lr_decay_iters", 1),
    ("schedule", "min_lr", 0),
    ("schedule", "warmup_iters", 0),
    ("precision", "initial_scale_power", 0),
    ("precision", "loss_scale_window", 1),
    ("precision", "hysteresis", 1),
    ("precision", "min_loss_scale", 0),
    ("precision", "loss_scale", 0),
    ("parallel", "pipe_parallel_size", 1),
    ("parallel", "model_parallel_size", 1),
    ("parallel", "dp_replicate", 1),
    ("parallel", "pipe_stages_per_rank", 1),
    ("parallel", "powersgd_rank", 1),
    ("checkpoint", "save_interval", 1),
    ("checkpoint", "keep_last_n_checkpoints", 1),
    ("logging", "log_interval", 1),
    ("logging", "profile_step_start", 0),
    ("logging", "profile_step_stop", 0),
    ("eval", "eval_interval", 0),
    ("eval", "eval_iters", 0),
    ("eval", "eval_tasks_interval", 1),
    ("eval", "eval_tasks_limit", 1),
    ("generation", "num_samples", 1),
    ("generation", "maximum_tokens", 1),
    ("generation", "temperature", 0),
    ("generation", "top_k", 0),
    ("generation", "repetition_penalty", 0),
    ("lora", "rank", 0),
]

# (group, field, low, high) closed-open or closed intervals written out in the message.
_FRACTIONS = [
    ("model", "hidden_dropout", 0.0, 1.0, "[0, 1)"),
    ("model", "attention_dropout", 0.0, 1.0, "[0, 1)"),
    ("schedule", "warmup", 0.0, 1.0, "[0, 1]"),
    ("generation", "top_p", 0.0, 1.0, "[0, 1]"),
    ("lora", "dropout", 0.0, 1.0, "[0, 1)"),
]


def _in(value: float, low: float, high: float, interval: str) -> bool:
    if interval == "[0, 1)":
        return low <= value < high
    return low <= value <= high


def validate(r: Resolved) -> None:
    cfg = r.config
    m, p = cfg.model, cfg.parallel

    def fail(group: str, name: str, message: str) -> None:
        raise ConfigError(f"{r.where(group, name)}: {message}")

    for g, name, low in _AT_LEAST:
        v = getattr(getattr(cfg, g), name, None)
        if v is not None and v < low:
            fail(g, name, f"must be at least {low}, got {v!r}")
    for g, name, low, high, interval in _FRACTIONS:
        v = getattr(getattr(cfg, g), name)
        if not _in(v, low, high, interval):
            fail(g, name, f"must be in {interval}, got {v!r}")

    lg = cfg.logging
    if lg.profile and lg.profile_step_stop < lg.profile_step_start:
        fail(
            "logging",
            "profile_step_stop",
            f"{lg.profile_step_stop} is before profile_step_start {lg.profile_step_start}; profiling needs start <= stop",
        )
    if m.hidden_size % m.num_attention_heads:
        fail(
            "model",
            "num_attention_heads",
            f"{m.num_attention_heads} heads do not divide hidden_size "
            f"{m.hidden_size} (set in {r.where('model', 'hidden_size')}); pick a divisor",
        )
    if m.num_attention_heads % m.num_kv_heads:
        fail(
            "model",
            "num_kv_heads",
            f"{m.num_kv_heads} key/value heads do not divide num_attention_heads "
            f"{m.num_attention_heads}; pick a divisor",
        )
    if not 0.0 < m.rotary_pct <= 1.0:
        fail("model", "rotary_pct", f"must be in (0, 1], got {m.rotary_pct!r}")
    if m.pos_emb == "rotary" and rotary_dims(m) % 2:
        blame = "rotary_pct" if ("model", "rotary_pct") in r.provenance else "hidden_size"
        fail(
            "model",
            blame,
            f"rotary would rotate {rotary_dims(m)} of each head's {head_dim(m)} "
            f"dimensions (hidden_size / num_attention_heads x rotary_pct {m.rotary_pct:g}); it needs an even number",
        )
    if m.max_position_embeddings < m.seq_length:
        fail(
            "model",
            "max_position_embeddings",
            f"{m.max_position_embeddings} is shorter than seq_length "
            f"{m.seq_length} (set in {r.where('model', 'seq_length')})",
        )
    if m.gpt_j_tied and not m.gpt_j_residual:
        fail("model", "gpt_j_tied", "needs gpt_j_residual: true")

    tp = p.model_parallel_size
    if m.num_attention_heads % tp:
        fail(
            "parallel",
            "model_parallel_size",
            f"tensor-parallel size {tp} does not divide num_attention_heads {m.num_attention_heads}",
        )
    if m.num_kv_heads % tp:
        fail(
            "parallel",
            "model_parallel_size",
            f"tensor-parallel size {tp} does not divide num_kv_heads {m.num_kv_heads}",
        )
    if p.pipe_parallel_size * p.pipe_stages_per_rank > m.num_layers:
        fail(
            "parallel",
            "pipe_parallel_size",
            f"{p.pipe_parallel_size} stages x {p.pipe_stages_per_rank} per rank is more than num_layers {m.num_layers}",
        )

    _check_batch_at_load(r)

    betas = cfg.optimizer.betas
    if len(betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    ):
        fail("optimizer", "betas", f"expected two numbers in [0, 1), got {betas!r}")
    cfg.optimizer.betas = [float(b) for b in betas]
    if cfg.schedule.min_lr > cfg.optimizer.lr:
        fail("schedule", "min_lr", f"{cfg.schedule.min_lr} is above the peak lr {cfg.optimizer.lr}")
    frac = cfg.schedule.lr_decay_fraction
    if frac is not None and not 0 < frac <= 1:
        fail("schedule", "lr_decay_fraction", f"must be in (0, 1], got {frac!r}")

    _check_data(r)
    _check_guards(r)
    _check_run_limits(r)
    _check_attention(r)
    _check_checkpointing(r)
    _check_curriculum(r)
    _check_moe(r)
    _check_rope_scaling(r)
    _check_mup(r)
    _check_lora(r)
    _check_distill(r)
    _check_post_training(r)


# post-training objectives that also run under pipeline stages (their loss on the last stage, neox.parallel.pipeline)
PIPELINED_IMPLS = ("dpo", "kto", "rm", "distill")


def _check_post_training(r: Resolved) -> None:
    """train_impl: the parameters' ranges, and the layouts and features a preference objective runs under."""
    cfg = r.config
    t, p = cfg.train, cfg.parallel
    if t.train_impl == "normal":
        return

    def fail(name: str, message: str, group: str = "train") -> None:
        raise ConfigError(f"{r.where(group, name)}: {message}")

    for name in ("dpo_beta", "kto_beta"):
        if not getattr(t, name) > 0:
            fail(name, f"must be above 0, got {getattr(t, name)!r}")
    if not 0 <= t.dpo_label_smoothing < 0.5:
        fail("dpo_label_smoothing", f"must be in [0, 0.5), got {t.dpo_label_smoothing!r}")
    if t.train_impl == "reinforce":
        if t.reinforce_max_new_tokens < 1 or t.reinforce_samples_per_prompt < 1:
            fail("reinforce_max_new_tokens", "reinforce_max_new_tokens and reinforce_samples_per_prompt must be >= 1")
        if t.reinforce_max_new_tokens >= cfg.model.seq_length:
            fail("reinforce_max_new_tokens", f"must be below seq_length {cfg.model.seq_length} (room for the prompt)")
        if not t.reinforce_temperature > 0:
            fail("reinforce_temperature", f"must be above 0 (sampling), got {t.reinforce_temperature!r}")
    for name in ("kto_desirable_weight", "kto_undesirable_weight"):
        if getattr(t, name) < 0:
            fail(name, f"must be >= 0, got {getattr(t, name)!r}")
    if p.pipe_parallel_size > 1 and t.train_impl not in PIPELINED_IMPLS:
        fail(
            "train_impl",
            f"{t.train_impl} runs in one process, under data and tensor parallelism and ZeRO, not with pipeline "
            "stages for now; set pipe_parallel_size to 1",
        )
    if t.curriculum_enabled:
        fail("train_impl", f"{t.train_impl} scores whole completions; turn curriculum_enabled off")


def _check_moe(r: Resolved) -> None:
    """Mixture-of-experts ranges, and the layouts MoE layers do not run under yet."""
    m, p = r.config.model, r.config.parallel

    def fail(group: str, name: str, message: str) -> None:
        raise ConfigError(f"{r.where(group, name)}: {message}")

    for name in ("moe_num_experts", "moe_top_k", "moe_expert_interval"):
        if getattr(m, name) < 1:
            fail("model", name, f"must be at least 1, got {getattr(m, name)!r}")
    for name in ("moe_min_capacity", "moe_num_shared_experts", "moe_aux_loss_coeff", "moe_z_loss_coeff"):
        if getattr(m, name) < 0:
            fail("model", name, f"must be at least 0, got {getattr(m, name)!r}")
    for name in ("moe_train_capacity_factor", "moe_eval_capacity_factor"):
        if getattr(m, name) <= 0:
            fail("model", name, f"must be above 0, got {getattr(m, name)!r}")
    if m.moe_jitter_eps is not None and not 0 <= m.moe_jitter_eps < 1:
        fail("model", "moe_jitter_eps", f"must be in [0, 1) (or null), got {m.moe_jitter_eps!r}")
    ep = p.expert_parallel_size
    if ep < 1:
        fail("parallel", "expert_parallel_size", f"must be at least 1, got {ep!r}")
    if ep > 1:
        if m.moe_num_experts % ep:
            fail("parallel", "expert_parallel_size", f"{ep} does not divide moe_num_experts {m.moe_num_experts}")
        if m.moe_dispatch != "grouped_mm":
            fail("parallel", "expert_parallel_size", "needs moe_dispatch: grouped_mm")
        if p.grad_compression != "none":
            fail("parallel", "grad_compression", "is a DDP hook; expert parallelism replicates through FSDP2: use none")
    if m.moe_num_experts == 1:
        return
    if m.moe_top_k > m.moe_num_experts:
        fail("model", "moe_top_k", f"{m.moe_top_k} is more than moe_num_experts {m.moe_num_experts}")
    if p.sequence_parallel and p.model_parallel_size > 1:
        fail(
            "parallel",
            "sequence_parallel",
            "is not implemented with MoE layers (their experts are replicated over tensor-parallel ranks and "
            "take whole sequences); set sequence_parallel: false",
        )


# the Linear layers of neox.model.GPT, by attribute name (neox.model.lora.targets checks the built model)
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "embed_out", "router")


def _check_lora(r: Resolved) -> None:
    """LoRA's ranges and target names, and the layouts it runs under (one process, DDP, FSDP, tensor and
    pipeline parallel; QLoRA one process only)."""
    lo, p = r.config.lora, r.config.parallel

    def fail(name: str, message: str, group: str = "lora") -> None:
        raise ConfigError(f"{r.where(group, name)}: {message}")

    if lo.rank <= 0:
        if lo.quantize != "none" or lo.double_quant or lo.quantize_all:
            key = "quantize" if lo.quantize != "none" else "double_quant" if lo.double_quant else "quantize_all"
            fail(key, "quantizes the base under LoRA adapters (QLoRA): set lora.rank > 0 (or remove it)")
        return
    if lo.quantize == "none" and (lo.double_quant or lo.quantize_all):
        fail("double_quant" if lo.double_quant else "quantize_all", "has no effect without lora.quantize: nf4 or fp4")

    if not lo.alpha > 0:
        fail("alpha", f"must be above 0, got {lo.alpha!r}")
    if not lo.target_modules:
        fail("target_modules", f"name at least one linear layer ({', '.join(LORA_TARGETS)})")
    for name in lo.target_modules:
        if name not in LORA_TARGETS:
            fail(
                "target_modules", f"{name!r} is not a linear layer of the model; choose from {', '.join(LORA_TARGETS)}"
            )
    if lo.quantize != "none" and (p.model_parallel_size > 1 or p.pipe_parallel_size > 1):
        # one process only: the Trainer refuses data parallelism, which it knows only at launch
        fail("quantize", "4-bit base weights (QLoRA) run on one process only for now; set lora.quantize: none")


def _check_distill(r: Resolved) -> None:
    """train_impl distill: a teacher, and the ranges of alpha, temperature and top-k (the layouts are
    _check_post_training's)."""
    t = r.config.train
    if t.train_impl != "distill":
        return

    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{r.where('train', name)}: {message}")

    if not (t.distill_teacher or t.distill_cache):
        fail("distill_teacher", "train_impl distill needs a teacher checkpoint: set train.distill_teacher")
    if t.distill_cache and t.distill_topk < 1:
        fail("distill_cache", "holds the teacher's top-k logits: set distill_topk to its k (above 0)")
    if not 0 <= t.distill_alpha <= 1:
        fail("distill_alpha", f"must be in [0, 1], got {t.distill_alpha!r}")
    if not t.distill_temperature > 0:
        fail("distill_temperature", f"must be above 0, got {t.distill_temperature!r}")
    if t.distill_topk < 0:
        fail("distill_topk", f"must be >= 0 (0 = the whole vocabulary), got {t.distill_topk!r}")


def _check_guards(r: Resolved) -> None:
    """The loss-spike window needs two losses for a standard deviation, and a z-score above zero."""
    tr = r.config.train
    if tr.loss_spike_window == 1:
        raise ConfigError(f"{r.where('train', 'loss_spike_window')}: must be 0 (off) or at least 2, got 1")
    if not tr.loss_spike_zscore > 0:
        raise ConfigError(f"{r.where('train', 'loss_spike_zscore')}: must be above 0, got {tr.loss_spike_zscore!r}")


def _check_checkpointing(r: Resolved) -> None:
    """The recomputation knobs only mean something with checkpoint_activations on."""
    tr = r.config.train
    if not tr.checkpoint_activations:
        for name, off in (("checkpoint_granularity", "full"), ("checkpoint_num_layers", 1)):
            if getattr(tr, name) != off and ("train", name) in r.provenance:
                raise ConfigError(
                    f"{r.where('train', name)}: {getattr(tr, name)!r} needs train.checkpoint_activations: true"
                )
    if tr.checkpoint_num_layers > 1 and tr.checkpoint_granularity != "full":
        raise ConfigError(
            f"{r.where('train', 'checkpoint_num_layers')}: blocks per checkpoint apply to checkpoint_granularity: "
            f"full, not {tr.checkpoint_granularity}; set it to 1"
        )


def _check_curriculum(r: Resolved) -> None:
    tr, seq = r.config.train, r.config.model.seq_length

    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{r.where('train', name)}: {message}")

    if not tr.curriculum_enabled:
        return
    if r.config.parallel.pipe_parallel_size > 1:
        fail(
            "curriculum_enabled",
            "a sequence-length curriculum is not supported with pipe_parallel_size > 1 (pipeline stages fix "
            "the activation shape at the first step)",
        )
    low, high = tr.curriculum_min_difficulty, tr.curriculum_max_difficulty
    if high is None:
        tr.curriculum_max_difficulty = high = seq
    if low is None:
        fail("curriculum_min_difficulty", "the curriculum needs a first sequence length (min_difficulty)")
    for name, v in (("curriculum_min_difficulty", low), ("curriculum_max_difficulty", high)):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= seq:
            fail(name, f"must be a whole number of tokens in [1, seq_length {seq}], got {v!r}")
    if low > high:
        fail("curriculum_min_difficulty", f"{low} is above max_difficulty {high}")
    kind = tr.curriculum_schedule_type
    if kind in ("fixed_linear", "fixed_root"):
        if tr.curriculum_total_steps is None:
            fail("curriculum_total_steps", f"schedule_type {kind} needs schedule_config.total_curriculum_step")
        if kind == "fixed_root" and not tr.curriculum_root_degree > 0:
            fail("curriculum_root_degree", f"must be positive, got {tr.curriculum_root_degree!r}")
        return
    lengths, steps = tr.curriculum_difficulties, tr.curriculum_max_steps
    if not steps or len(lengths) != len(steps) + 1:
        fail(
            "curriculum_difficulties",
            f"fixed_discrete needs schedule_config.max_step (non-empty) and one more difficulty than max_step "
            f"entries, got {len(lengths)} difficulties and {len(steps)} max_step",
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= seq for v in lengths):
        fail("curriculum_difficulties", f"each must be a number of tokens in [1, seq_length {seq}], got {lengths!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps) or steps != sorted(steps):
        fail("curriculum_max_steps", f"must be increasing step numbers, got {steps!r}")


def _check_attention(r: Resolved) -> None:
    """attention_config expanded to one type per layer, sparsity_config checked for the types in use."""
    m = r.config.model
    m.attention_types = expand_attention_config(m.attention_types, m.num_layers, r.where("model", "attention_types"))
    m.sparsity_config = check_sparsity_keys(m.sparsity_config, r.where("model", "sparsity_config"))
    for kind in sorted(set(m.attention_types) & set(BLOCK_SPARSE)):
        where = r.where("model", "sparsity_config")
        if ("model", "sparsity_config") not in r.provenance:
            where = f"{r.where('model', 'attention_types')} (with the default sparsity_config)"
        check_sparsity_params(sparsity_params(kind, m.sparsity_config), m.seq_length, where)
    w = m.sliding_window_width
    if w is not None and w < 1:
        raise ConfigError(f"{r.where('model', 'sliding_window_width')}: must be at least 1 (or null), got {w!r}")


def _check_batch_at_load(r: Resolved) -> None:
    """What can be checked without the data-parallel size: the global batch must split into micro * accum."""
    tr = r.config.train
    micro, accum, total = tr.train_micro_batch_size_per_gpu, tr.gradient_accumulation_steps, tr.train_batch_size
    if total is None:
        return
    per_rank = (micro or 1) * (accum or 1)
    if (micro is not None or accum is not None) and total % per_rank:
        raise ConfigError(
            f"{r.where('train', 'train_batch_size')}: {total} is not a multiple of train_micro_batch_size_per_gpu"
            f" {micro} x gradient_accumulation_steps {accum} (= micro x accum x data-parallel size); fix one of them"
        )


def _check_data(r: Resolved) -> None:
    d = r.config.data
    for kind in ("train", "valid", "test"):
        paths, weights = getattr(d, f"{kind}_data_paths"), getattr(d, f"{kind}_data_weights")
        if weights and len(weights) != len(paths):
            raise ConfigError(
                f"{r.where('data', f'{kind}_data_weights')}: {len(weights)} weights for "
                f"{len(paths)} {kind}_data_paths; give one weight per path"
            )
        if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights):
            raise ConfigError(
                f"{r.where('data', f'{kind}_data_weights')}: weights must be non-negative numbers, got {weights!r}"
            )
    for kind, key in (
        ("train", "label_data_paths"),
        ("valid", "valid_label_data_paths"),
        ("test", "test_label_data_paths"),
    ):
        labels, paths = getattr(d, key), getattr(d, f"{kind}_data_paths")
        if labels and len(labels) != len(paths):
            raise ConfigError(
                f"{r.where('data', key)}: {len(labels)} label datasets for "
                f"{len(paths)} {kind}_data_paths; give one per {kind} path"
            )
    split_proportions(d.split, r.where("data", "split"))


def split_proportions(split: str, where: str = "data.split") -> list[float]:
    """GPT-NeoX `split: "969,30,1"` (or "/"-separated; missing parts are 0) -> three fractions."""
    parts = [s.strip() for s in split.replace("/", ",").split(",")]
    try:
        values = [float(s) for s in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not v >= 0 for v in values) or sum(values) <= 0:  # `not >=`: NaN too
        raise ConfigError(f"{where}: expected up to three non-negative numbers like '969,30,1', got {split!r}")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def validate_training(r: Resolved) -> None:
    """Rules that only apply when training: there must be data to train on and a tokenizer file to read it."""
    cfg = r.config
    d = cfg.data
    if cfg.train.max_runtime is not None and not cfg.checkpoint.save:
        raise ConfigError(
            f"{r.where('train', 'max_runtime')}: the run saves a checkpoint before its budget ends, so it needs "
            "checkpoint.save; set save or drop max_runtime"
        )
    for name in ("nonfinite_policy", "loss_spike_policy"):
        if getattr(cfg.train, name) == "rollback" and not cfg.checkpoint.save:
            raise ConfigError(
                f"{r.where('train', name)}: rollback reloads a checkpoint of this run; set checkpoint.save"
            )
    if cfg.train.train_impl in ("dpo", "rm"):
        if not (d.pos_train_data_paths and d.neg_train_data_paths):
            raise ConfigError(
                f"{r.where('data', 'pos_train_data_paths')}: train_impl {cfg.train.train_impl} needs pos_train_data_paths and "
                "neg_train_data_paths with their label datasets (neox preprocess --preference pairs)"
            )
    elif cfg.train.train_impl == "kto" and not (d.train_data_paths and d.train_reward_data_paths):
        raise ConfigError(
            f"{r.where('data', 'train_reward_data_paths')}: train_impl kto needs train_data_paths, "
            "label_data_paths and train_reward_data_paths (neox preprocess --preference unpaired)"
        )
    elif cfg.train.train_impl == "reinforce" and not (d.train_data_paths and cfg.train.reinforce_reward_model):
        raise ConfigError(
            f"{r.where('train', 'reinforce_reward_model')}: train_impl reinforce needs train_data_paths (prompts, "
            "one per document) and reinforce_reward_model (a train_impl: rm checkpoint)"
        )
    elif not d.data_path and not d.train_data_paths:
        raise ConfigError(
            f"{r.where('data', 'data_path')}: training needs data: set data_path (a "
            "PREFIX_text_document built by `neox preprocess`) or train_data_paths"
        )
    if d.data_path and d.train_data_paths:
        raise ConfigError(
            f"{r.where('data', 'train_data_paths')}: set either data_path (split by 'split') or "
            f"train_data_paths, not both (data_path is set in {r.where('data', 'data_path')})"
        )
    t = cfg.tokenizer
    needs_file = t.tokenizer_type in ("HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer", "TiktokenTokenizer")
    if needs_file and not t.vocab_file:
        # blame where the type was chosen: the unset vocab_file has no file or line of its own
        raise ConfigError(
            f"{r.where('tokenizer', 'tokenizer_type')}: tokenizer_type {t.tokenizer_type} needs "
            "vocab_file; set tokenizer.vocab_file"
        )
    if t.tokenizer_type == "GPT2BPETokenizer" and not t.merge_file:
        raise ConfigError(
            f"{r.where('tokenizer', 'tokenizer_type')}: GPT2BPETokenizer needs merge_file "
            "(merges.txt); set tokenizer.merge_file"
        )


def resolve_batch(cfg: Config, dp_size: int) -> tuple[int, int, int]:
    """GPT-NeoX's batch triple: global = micro * accum * dp, from any two of them (micro alone: accum 1)."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    tr = cfg.train
    micro, accum, total = tr.train_micro_batch_size_per_gpu, tr.gradient_accumulation_steps, tr.train_batch_size
    keys = "train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps"
    if micro is not None and accum is not None and total is not None:
        if micro * accum * dp_size != total:
            raise ConfigError(
                f"config: keys {keys}: inconsistent: micro {micro} x accum {accum} x data-parallel "
                f"{dp_size} = {micro * accum * dp_size}, not train_batch_size {total}; "
                "set two of the three"
            )
        return micro, accum, total
    if total is not None and micro is not None:
        if total % (micro * dp_size):
            raise ConfigError(
                f"config: key 'train_batch_size': {total} is not divisible by micro {micro} x data-parallel {dp_size}"
            )
        return micro, total // (micro * dp_size), total
    if total is not None and accum is not None:
        if total % (accum * dp_size):
            raise ConfigError(
                f"config: key 'train_batch_size': {total} is not divisible by accum {accum} x data-parallel {dp_size}"
            )
        return total // (accum * dp_size), accum, total
    if micro is not None:
        accum = accum or 1
        return micro, accum, micro * accum * dp_size
    if total is not None:
        if total % dp_size:
            raise ConfigError(f"config: key 'train_batch_size': {total} is not divisible by data-parallel {dp_size}")
        return total // dp_size, 1, total
    raise ConfigError(
        f"config: keys {keys}: the batch size is not set; set train_micro_batch_size_per_gpu "
        "(and gradient_accumulation_steps or train_batch_size) or train_batch_size"
    )


def resolve_vocab(cfg: Config, tokenizer_vocab_size: int, tp: int = 1) -> int:
    """Fill model.vocab_size: the tokenizer's size padded to make_vocab_size_divisible_by * tp."""
    m = cfg.model
    if m.vocab_size is None:
        multiple = m.make_vocab_size_divisible_by * tp
        m.vocab_size = multiple * math.ceil(tokenizer_vocab_size / multiple)
    elif m.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"config: key 'model.vocab_size': {m.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer_vocab_size}); raise it or leave it unset to derive it"
        )
    elif m.vocab_size % tp:
        raise ConfigError(
            f"config: key 'model.vocab_size': {m.vocab_size} is not divisible by the tensor-parallel "
            f"size {tp}; leave it unset to derive a padded size"
        )
    return m.vocab_size


_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: str | None, where: str = "train.max_runtime") -> float | None:
    """Seconds in a duration: a number of seconds ("3600"), units ("90m", "2h", "1h30m", "1d"), or a clock time
    "HH:MM:SS" / "D-HH:MM:SS" (Slurm's --time forms with seconds). None stays None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    clock = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]?\d):([0-5]?\d(?:\.\d*)?)", text)
    if clock:
        days, hours, minutes, seconds = clock.groups()
        total = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    elif re.fullmatch(r"\d+(?:\.\d*)?", text):
        total = float(text)
    elif re.fullmatch(r"(?:\d+(?:\.\d*)?[dhms])+", text):
        total = sum(float(n) * _DURATION_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d*)?)([dhms])", text))
    else:
        raise ConfigError(
            f"{where}: {value!r} is not a duration; give seconds (3600), units (90m, 2h, 1h30m, 1d) or HH:MM:SS"
        )
    if not total > 0:
        raise ConfigError(f"{where}: the duration must be more than 0 seconds, got {value!r}")
    return total


def _check_run_limits(r: Resolved) -> None:
    t = r.config.train
    parse_duration(t.max_runtime, r.where("train", "max_runtime"))
    if t.hang_timeout is not None and not t.hang_timeout > 0:
        raise ConfigError(
            f"{r.where('train', 'hang_timeout')}: must be a number of seconds > 0, got {t.hang_timeout!r}"
        )


def _check_rope_scaling(r: Resolved) -> None:
    m = r.config.model
    if m.rope_scaling is None:
        return
    try:
        scaling = parse_rope_scaling(m.rope_scaling, m.max_position_embeddings)
    except ValueError as e:
        raise ConfigError(f"{r.where('model', 'rope_scaling')}: {e}") from None
    if scaling is not None and m.pos_emb != "rotary":
        raise ConfigError(f"{r.where('model', 'rope_scaling')}: scales rotary embeddings; needs pos_emb: rotary")


_MUP_DEFAULTS = {
    "mup_base_config": None,
    "mup_base_hidden_size": None,
    "mup_base_num_attention_heads": None,
    "mup_base_intermediate_size": None,
    "mup_init_scale": 1.0,
    "mup_attn_temp": 1.0,
    "mup_output_temp": 1.0,
    "mup_embedding_mult": 1.0,
}


def _check_mup(r: Resolved) -> None:
    """muP settings: positive, only with use_mup, and a base model whose heads divide its width."""
    m = r.config.model

    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{r.where('model', name)}: {message}")

    for name, default in _MUP_DEFAULTS.items():
        value = getattr(m, name)
        if value != default and not m.use_mup:
            fail(name, "has no effect without use_mup: true")
        if value is not None and name != "mup_base_config" and not value > 0:
            fail(name, f"must be positive, got {value!r}")
    if not m.use_mup:
        return
    width = m.mup_base_hidden_size or m.hidden_size
    heads = m.mup_base_num_attention_heads or m.num_attention_heads
    if width % heads:
        fail("mup_base_hidden_size", f"the base width {width} is not divisible by its {heads} attention heads")
    if (m.num_kv_heads * heads) % m.num_attention_heads:
        fail(
            "mup_base_num_attention_heads",
            f"{heads} base heads cannot keep num_kv_heads / num_attention_heads ({m.num_kv_heads}/{m.num_attention_heads})",
        )
