"""GPT-NeoX key names and what each one becomes here.

Every GPT-NeoX (and DeepSpeed-in-GPT-NeoX) key that a user may write falls in exactly one table:
- a schema field (`num_layers`: accepted flat or in its group, see loader.FLAT), or a rename (`RENAMES`);
- a structured key with a handler (`optimizer: {type, params}`, `fp16: {...}`, `zero_optimization: {...}`, ...);
- `NO_EFFECT`: accepted because it changes nothing observable here (DeepSpeed bucket sizes, kernel fusion
  flags: attention always runs through fused SDPA), with the reason, which `neox config show` prints;
- `ONLY_DEFAULT`: accepted at the values that mean "feature off", rejected otherwise with the reason;
- `REJECTED`: an error with the reason and, where there is one, what to use instead.
Keys are in normalised form (hyphens become underscores). docs/config.md lists all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neox.config.attention import type_problem
from neox.config.fields import Assignment, did_you_mean, group_fields, normalize_key
from neox.errors import ConfigError

# Field names that are not accepted flat at the top level because they mean nothing out of their group.
# lora.rank / alpha / dropout are set inside their group (GPT-NeoX has a run-time `rank` key of its own)
NOT_FLAT = {"type", "rank", "alpha", "dropout"}

RENAMES: dict[str, tuple[str, str]] = {
    "checkpoint_factor": ("checkpoint", "save_interval"),
    "gas": ("train", "gradient_accumulation_steps"),
    "batch_size": ("train", "train_micro_batch_size_per_gpu"),
    "feedforward_size": ("model", "intermediate_size"),
    "clip_grad": ("train", "gradient_clipping"),
    "num_key_value_heads": ("model", "num_kv_heads"),
    "min_scale": ("precision", "min_loss_scale"),
    "train_label_data_paths": ("data", "label_data_paths"),
    "moe_loss_coeff": ("model", "moe_aux_loss_coeff"),
    "num_experts": ("model", "moe_num_experts"),
    "expert_interval": ("model", "moe_expert_interval"),
    "moe_expert_parallel_size": ("parallel", "expert_parallel_size"),
}

# (group, key) -> target, for GPT-NeoX spellings written inside one of our groups.
GROUP_RENAMES: dict[tuple[str, str], tuple[str, str]] = {
    ("checkpoint", "checkpoint_factor"): ("checkpoint", "save_interval"),
    ("train", "gas"): ("train", "gradient_accumulation_steps"),
}

# DeepSpeed's own `checkpoint: {...}` block shares its name with our checkpoint group.
GROUP_NO_EFFECT: dict[tuple[str, str], str] = {
    ("checkpoint", k): "DeepSpeed checkpoint option; checkpoints are written by torch.distributed.checkpoint"
    for k in ("tag_validation", "use_node_local_storage", "parallel_write", "load_universal")
}

_FUSED = "attention always runs through fused scaled_dot_product_attention; other fusions are torch.compile's job (train.compile)"
_DEEPSPEED_COMM = "DeepSpeed communication tuning; FSDP2/DDP choose their own buckets and overlap"
_LAUNCH = (
    "processes are launched from the command line: `neox train --nproc N`, `--hostfile FILE`, "
    "`--nnodes/--node-rank/--master-addr/--master-port`, or inside a Slurm step (neox/parallel/launch.py)"
)
_RUNTIME = "GPT-NeoX fills this in at run time; it is computed here too"

NO_EFFECT: dict[str, str] = {
    **dict.fromkeys(
        (
            "scaled_upper_triang_masked_softmax_fusion",
            "scaled_masked_softmax_fusion",
            "bias_gelu_fusion",
            "bias_dropout_fusion",
            "rope_fusion",
            "use_flashattn_swiglu",
            "layernorm_fusion",
            "rmsnorm_fusion",
            "use_fused_layer_norm",
        ),
        _FUSED,
    ),
    **dict.fromkeys(
        (
            "zero_reduce_scatter",
            "zero_contiguous_gradients",
            "zero_reduce_bucket_size",
            "zero_allgather_bucket_size",
            "prescale_gradients",
            "gradient_predivide_factor",
            "sparse_gradients",
            "communication_data_type",
            "zero_allow_untested_optimizer",
        ),
        _DEEPSPEED_COMM,
    ),
    **dict.fromkeys(
        (
            "launcher",
            "hostfile",
            "include",
            "exclude",
            "num_nodes",
            "num_gpus",
            "master_port",
            "master_addr",
            "deepspeed_slurm",
            "deepspeed_mpi",
            "no_ssh_check",
            "force_multi",
            "comment",
            "user_script",
            "detect_nvlink_pairs",
            "account",
            "deepspeed",
        ),
        _LAUNCH,
    ),
    **dict.fromkeys(
        (
            "world_size",
            "is_pipe_parallel",
            "global_num_gpus",
            "local_rank",
            "rank",
            "iteration",
            "do_train",
            "do_valid",
            "do_test",
            "save_iters",
            "git_hash",
            "padded_vocab_size",
            "tensorboard_writer",
        ),
        _RUNTIME,
    ),
    "distributed_backend": "the backend follows the device (gloo on CPU, nccl on CUDA); set parallel.backend to force one",
    "partition_activations": "Megatron activation partitioning across tensor-parallel ranks; use parallel.sequence_parallel",
    "synchronize_each_layer": "a CUDA synchronisation used for debugging DeepSpeed activation checkpointing",
    "contiguous_checkpointing": "DeepSpeed activation-checkpoint buffer layout; torch.utils.checkpoint needs none",
    "profile_backward": "DeepSpeed activation-checkpoint profiling",
    "steps_per_print": "DeepSpeed's own console print interval; log_interval controls logging",
    "wall_clock_breakdown": "DeepSpeed timer printout; step times are always in metrics.jsonl",
    "use_cpu_initialization": "weights are always initialised on the CPU-or-meta device chosen by the parallel layout",
    "attention_softmax_in_fp32": "the SDPA kernels accumulate the softmax in fp32",
    "data_types": "gradients accumulate in the parameters' dtype: fp32 master weights, except bf16_mode: pure",
    "output_layer_parallelism": "the tensor-parallel plan shards the output layer along the vocabulary",
    "gmlp_attn_dim": "only used by gMLP layers, which are not implemented",
    "rotary_save_freqs_buffer": "rotary frequencies are recomputed, never stored in checkpoints",
    "use_shared_fs": "checkpoints are written with torch.distributed.checkpoint, which needs no shared-fs hint",
    "lazy_mpu_init": "Megatron model-parallel init detail",
    "onnx_safe": "ONNX export is not part of neox",
    "deepscale": "deprecated GPT-NeoX flag",
    "deepscale_config": "deprecated GPT-NeoX flag",
    "short_seq_prob": "only used by BERT-style data, which GPT-NeoX does not build either",
    "peak_theoretical_tflops": "MFU is computed against the measured peak",
    "eval_results_prefix": "lm-eval results go to `neox eval --output DIR`, and eval_tasks results during "
    "training into metrics.jsonl",
    "param_sharing_style": "only meaningful with num_unique_layers, which is not supported",
    "checkpoint_scale": "save_interval / extra_save_iters decide when to save",
    "override_lr_scheduler": "the schedule is always a function of the iteration computed from the config "
    "(what GPT-NeoX does with override_lr_scheduler: true)",
    "zero_hpz_partition_size": _DEEPSPEED_COMM,
    "deepspeed_activation_checkpointing": "checkpoint_activations switches torch.utils.checkpoint on",
    "activation_checkpointing": "DeepSpeed's activation-checkpointing block; checkpoint_activations switches "
    "torch.utils.checkpoint on",
    "load_universal": "DCP checkpoints load into any parallel layout without conversion",
    "adlr_autoresume_interval": "only used with adlr_autoresume, which is not supported",
    "mup_width_scale": "muP needs no delta model here: the width multipliers are this model's widths over "
    "model.mup_base_*",
    "dynamic_loss_scale": "fp16 loss scaling is dynamic exactly when loss_scale is unset (or 0)",
    "curriculum_seqlen": "GPT-NeoX tracks the current curriculum length in it at run time; it is computed "
    "here too (train.curriculum_*)",
    "create_moe_param_group": "DeepSpeed's separate optimizer group for expert weights; expert parameters "
    "take the same optimizer settings as the others",
    "moe_use_residual": "only used by GPT-NeoX's DeepSpeed MoE (moe_type: deepspeed), not by its dropless MoE "
    "or this one; for an always-on dense expert set moe_num_shared_experts",
    **dict.fromkeys(
        (
            "mamba_selective_scan_fusion",
            "mamba_causal_conv_fusion",
            "mamba_inner_func_fusion",
            "mamba_selective_fp32_params",
            "mamba_use_bias_in_conv",
            "mamba_use_bias_in_linears",
            "dim_att",
            "head_size",
            "ffn_dim",
        ),
        "only used by Mamba / RWKV layers, which are not implemented",
    ),
    **dict.fromkeys(
        ("dpo_fp32", "kto_fp32"),
        "sequence log-probabilities and preference losses are always computed in fp32",
    ),
}

# key -> (values meaning "off", reason when another value is given)
ONLY_DEFAULT: dict[str, tuple[tuple, str]] = {
    "moe_type": (
        ("megablocks",),
        "only the dropless (megablocks-style) MoE is implemented; DeepSpeed MoE's "
        "capacity-limited routing is moe_token_dropping: true",
    ),
    "moe_glu": ((False,), "experts are gated exactly when activation is geglu, swiglu or reglu; set activation"),
    "enable_expert_tensor_parallelism": ((False,), "expert weights are not split by tensor parallelism"),
    "use_tutel": ((False,), "Tutel kernels are not used: experts run as one grouped matmul"),
    "num_unique_layers": ((None,), "layer sharing is not implemented"),
    "soft_prompt_tuning": ((None, {}, {"enabled": False}), "soft prompt tuning is not implemented"),
    "opt_pos_emb_offset": ((0,), "OPT's learned position offset is not implemented"),
    "apply_query_key_layer_scaling": (
        (False,),
        "not implemented: SDPA keeps the softmax in fp32, which is what this flag protects",
    ),
    "fp16_lm_cross_entropy": ((False,), "the loss is always computed in fp32"),
    "use_checkpoint_lr_scheduler": ((False,), "the schedule is always recomputed from the config"),
    "log_grad_pct_zeros": ((False,), "not implemented"),
    "log_optimizer_states": ((False,), "not implemented"),
    "wandb_init_all_ranks": ((False,), "W&B runs on rank 0 only"),
    "memory_profiling": ((False,), "use torch.profiler / PYTORCH_CUDA_ALLOC_CONF directly"),
    "adlr_autoresume": ((False,), "NVIDIA ADLR cluster auto-resume is not supported; resume with checkpoint.load"),
    "exit_interval": ((None,), "stop with train_iters instead"),
    "coord_check": ((False,), "run `neox mup coord-check CONFIG --widths ...` instead of a training run"),
    "save_base_shapes": ((False,), "no base-shapes file is needed: the base model is model.mup_base_config"),
    "char_level_ppl": ((False,), "not implemented"),
    "use_comet": ((False, None), "Comet logging is not supported (TensorBoard and W&B are)"),
    **dict.fromkeys(
        ("comet_workspace", "comet_project", "comet_experiment_name", "comet_tags", "comet_others"),
        ((None,), "Comet logging is not supported (TensorBoard and W&B are)"),
    ),
    "dataset_impl": (("gpt2",), "only the GPT-2 style language-model dataset is implemented"),
    "z_loss": ((0, 0.0), "z-loss is not implemented"),
    "train_epochs": ((None,), "set train_iters instead"),
    "no_save_optim": ((False,), "checkpoints always hold the optimizer state (use no_load_optim when loading)"),
    "no_save_rng": ((False,), "checkpoints always hold the RNG state (use no_load_rng when loading)"),
    "checkpoint_in_cpu": ((False,), "activation checkpoints are recomputed, never offloaded"),
    "memory_profiling_path": ((None,), "memory profiling is not implemented"),
    "sparse_attention": (
        (None, {}),
        "DeepSpeed's own sparse_attention block is not read; set attention_config and sparsity_config",
    ),
    "data_efficiency": ((None, {}), "DeepSpeed data efficiency is not supported"),
    "compression_training": ((None, {}), "DeepSpeed compression training is not supported"),
    "wandb": ((None, {}), "DeepSpeed's monitor block; use use_wandb and wandb_project"),
    "autotuning_run": ((None,), "DeepSpeed autotuning is not supported"),
    "mup_rp_embedding_mult": ((1, 1.0), "the T5 relative-position bias (pos_emb: rpe) has no muP multiplier here"),
    "return_logits": ((False,), "generation returns text"),
    "prompt_end": (("\n",), "prompts are one per line (or JSONL)"),
    "model_arch": (("gpt2",), "only decoder-only models are implemented"),
    "te_columnparallel": ((False,), "TransformerEngine is CUDA-only and not used"),
    "te_rowparallel": ((False,), "TransformerEngine is CUDA-only and not used"),
    "te_layernorm_mlp": ((False,), "TransformerEngine is CUDA-only and not used"),
    "te_mha": ((False,), "TransformerEngine is CUDA-only and not used"),
    "te_fp8_format": ((None,), "TransformerEngine is CUDA-only and not used"),
    "checkpoint_validation_with_forward_pass": ((False,), "not implemented"),
    "dump_state": ((False,), "DeepSpeed state dump is not supported"),
    "autotuning": ((None, {}), "DeepSpeed autotuning is not supported"),
    "flops_profiler": ((None, {}), "DeepSpeed flops profiler is not supported; see `neox info` for FLOPs"),
    "comms_logger": ((None, {}), "DeepSpeed comms logger is not supported"),
    "elasticity": ((None, {}), "DeepSpeed elasticity is not supported; torchrun restarts failed groups"),
    "tensorboard": ((None, {}), "DeepSpeed's monitor block; use tensorboard_dir"),
    "csv_monitor": ((None, {}), "DeepSpeed's CSV monitor; metrics.jsonl is always written"),
}

REJECTED: dict[str, str] = {
    "amp": "apex AMP is not used; set precision: fp16 (or bf16)",
    "scheduler": "the DeepSpeed scheduler block is not used; set lr_decay_style, warmup and min_lr",
    "wandb_team": "set the WANDB_ENTITY environment variable instead",
    "wandb_host": "set the WANDB_BASE_URL environment variable instead",
    "s3_path": "neox does not upload checkpoints (no network at run time); copy checkpoint.save yourself",
    "s3_chunk_size": "neox does not upload checkpoints",
    "base_shapes_file": "give the muP base model as a config instead: model.mup_base_config (or its widths: "
    "mup_base_hidden_size, mup_base_num_attention_heads, mup_base_intermediate_size)",
    "decoder_seq_length": "only decoder-only models are implemented; use seq_length",
    "num_encoder_layers": "only decoder-only models are implemented",
    "precompute_model_name": "DPO/KTO training is not implemented",
    "deepspeed_extra_args": "DeepSpeed is not used",
    "config_files": "pass config files on the command line",
}

# Values renamed per target (GPT-NeoX spelling -> ours), matched case-insensitively.
VALUE_RENAMES: dict[tuple[str, str], dict[Any, Any]] = {
    ("precision", "precision"): {
        "bfloat16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        "float32": "fp32",
        "float": "fp32",
    },
    ("parallel", "pipe_parallel_size"): {0: 1},  # GPT-NeoX: 0 = no pipeline engine; here 1 stage = none
    ("parallel", "pipe_partition_method"): {"type:transformer|mlp": "uniform", "type:transformer": "uniform"},
    ("data", "data_impl"): {"infer": "mmap"},
    ("precision", "loss_scale"): {0: None},  # DeepSpeed / GPT-NeoX: 0 = dynamic
}

REJECTED_VALUES: dict[tuple[str, str], dict[str, str]] = {
    ("tokenizer", "tokenizer_type"): {
        "hfgpt2tokenizer": "use GPT2BPETokenizer (vocab.json + merges.txt) or HFTokenizer (tokenizer.json)",
    },
}


def map_value(target: tuple[str, str], value: Any) -> Any:
    table = VALUE_RENAMES.get(target)
    if not table or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value
    key = value.lower() if isinstance(value, str) else value
    return table.get(key, value)


def rejected_value(target: tuple[str, str], value: Any) -> str | None:
    if isinstance(value, str):
        return REJECTED_VALUES.get(target, {}).get(value.lower())
    return None


# -- structured keys ----------------------------------------------------------------------------------------


def _mapping(c, key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise c.error(key, f"expected a mapping, got {value!r}")
    return value


def _bool(c, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise c.error(key, f"expected true or false, got {value!r}")
    return value


def handle_precision(c, key: str, value: Any) -> None:
    """`precision: bfloat16` (GPT-NeoX) - the dict form is our group and never reaches here."""
    c.set(("precision", "precision"), value, key)


# GPT-NeoX optimizer types -> ours. GPT-NeoX's `Adam` is apex FusedAdam (and `cpu_adam` DeepSpeedCPUAdam),
# both in their default decoupled-weight-decay mode, i.e. AdamW; `cpu_torch_adam` is torch.optim.Adam (L2).
NEOX_OPTIMIZERS = {
    "adam": "adamw",
    "cpu_adam": "adamw",
    "cpu_torch_adam": "adam",
    "sgd": "sgd",
    "adamw": "adamw",
    "lion": "lion",
    "sm3": "sm3",
    "madgrad_wd": "madgrad_wd",
    "adafactor": "adafactor",
    "muon": "muon",
}


# names only GPT-NeoX has, read with its meaning in our form too (`--set optimizer.type=cpu_adam`)
NEOX_ONLY_OPTIMIZERS = ("cpu_adam", "cpu_torch_adam", "onebitadam")


def _neox_optimizer_type(c, key: str, value: Any) -> None:
    if isinstance(value, str) and value.lower() == "onebitadam":
        # DeepSpeed's 1-bit Adam = Adam whose gradient all-reduce is 1-bit compressed after a warm-up:
        # here AdamW with the onebit communication hook (parallel.grad_compression_start_iter is its freeze_step)
        c.set(("parallel", "grad_compression"), "onebit", key)
        value = "adamw"
    if isinstance(value, str) and value.lower() in NEOX_OPTIMIZERS:
        value = NEOX_OPTIMIZERS[value.lower()]
    c.set(("optimizer", "type"), value, key)


def handle_optimizer_type(c, key: str, value: Any) -> None:
    """GPT-NeoX's flat `optimizer_type: adam` (decoupled decay, see NEOX_OPTIMIZERS)."""
    _neox_optimizer_type(c, key, value)


def handle_optimizer(c, key: str, value: Any) -> None:
    """GPT-NeoX `optimizer: {type: Adam, params: {lr, betas, eps, weight_decay}}` and our `optimizer: {type: adamw,
    lr: ...}`. A `params` mapping marks the GPT-NeoX form, whose `type` is read with GPT-NeoX's meaning."""
    fields = group_fields("optimizer")
    mapping = _mapping(c, key, value)
    neox_form = any(normalize_key(k) == "params" for k in mapping)
    for raw, v in mapping.items():
        k, shown = normalize_key(raw), f"{key}.{raw}"
        if k == "type" and (neox_form or (isinstance(v, str) and v.lower() in NEOX_ONLY_OPTIMIZERS)):
            _neox_optimizer_type(c, shown, v)
        elif k == "type" and isinstance(v, str) and v.lower() in NEOX_OPTIMIZERS:
            c.set(("optimizer", "type"), v.lower(), shown)  # names are case-insensitive, as in GPT-NeoX
        elif k == "params":
            for praw, pv in _mapping(c, shown, v).items():
                pk, pshown = normalize_key(praw), f"{shown}.{praw}"
                if pk in fields and pk != "type":
                    c.set(("optimizer", pk), pv, pshown)
                elif pk == "freeze_step":  # 1-bit Adam's uncompressed warm-up steps
                    c.set(("parallel", "grad_compression_start_iter"), pv, pshown)
                elif pk in ("cuda_aware", "comm_backend_name"):
                    c.note(pshown, "1-bit Adam transport settings: the onebit hook uses the process group's backend")
                else:
                    raise c.error(pshown, "unknown optimizer parameter" + did_you_mean(pk, fields))
        elif k in fields:
            c.set(("optimizer", k), v, shown)
        elif ("optimizer", k) in GROUP_RENAMES:
            c.set(GROUP_RENAMES[("optimizer", k)], v, shown)
        else:
            raise c.error(shown, "unknown optimizer setting" + did_you_mean(k, list(fields) + ["params"]))


_FP16_SCALER = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")


def handle_fp16(c, key: str, value: Any) -> None:
    """DeepSpeed `fp16: {enabled, loss_scale (0 = dynamic), initial_scale_power, ...}`."""
    d = {normalize_key(k): (k, v) for k, v in _mapping(c, key, value).items()}
    enabled = False
    for flag in ("enabled", "fp16"):  # Pythia configs carry both `fp16: true` and `enabled: true`
        if flag in d:
            enabled = enabled or _bool(c, f"{key}.{d[flag][0]}", d[flag][1])
    dtype = "fp16"
    for k, (raw, v) in d.items():
        shown = f"{key}.{raw}"
        if k in ("enabled", "fp16"):
            continue
        if k == "type":  # early GPT-NeoX configs: fp16: {enabled: true, type: bfloat16}
            dtype = map_value(("precision", "precision"), v)
            if dtype not in ("fp16", "bf16"):
                raise c.error(shown, f"expected bfloat16 or float16, got {v!r}")
        elif k == "loss_scale":
            # DeepSpeed: 0 means dynamic loss scaling.
            c.set(("precision", "loss_scale"), None if v == 0 else v, shown)
        elif k in _FP16_SCALER:
            c.set(("precision", k), v, shown)
        elif k == "consecutive_hysteresis":
            if _bool(c, shown, v):
                raise c.error(shown, "unsupported value true: the scaler counts overflows, not consecutive ones")
        elif k == "auto_cast":
            _bool(c, shown, v)
            c.note(shown, "fp16 always runs under autocast with fp32 master weights")
        else:
            raise c.error(
                shown,
                "unknown fp16 setting"
                + did_you_mean(
                    k, ["enabled", "type", "loss_scale", "consecutive_hysteresis", "auto_cast", *_FP16_SCALER]
                ),
            )
    if enabled:
        c.set(("precision", "precision"), dtype, key, ident=("key", key))


def handle_bf16(c, key: str, value: Any) -> None:
    """DeepSpeed `bf16: {enabled: true}`."""
    for raw, v in _mapping(c, key, value).items():
        k, shown = normalize_key(raw), f"{key}.{raw}"
        if k == "enabled":
            if _bool(c, shown, v):
                c.set(("precision", "precision"), "bf16", key, ident=("key", key))
        elif k in ("immediate_grad_update", "check_grad_overflow", "accumulate_grads_via_hooks"):
            c.note(shown, "DeepSpeed bf16 optimizer detail; fp32 master weights are updated every step")
        else:
            raise c.error(shown, "unknown bf16 setting; only 'enabled' is read")


_ZERO_TUNING = (
    "allgather_partitions",
    "allgather_bucket_size",
    "overlap_comm",
    "reduce_scatter",
    "reduce_bucket_size",
    "contiguous_gradients",
    "round_robin_gradients",
    "sub_group_size",
    "elastic_checkpoint",
    "load_from_fp32_weights",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
    "ignore_unused_parameters",
    "legacy_stage1",
    "zero_hpz_partition_size",
    "zero_quantized_weights",
    "zero_quantized_gradients",
    "mics_shard_size",
    "cpu_offload_use_pin_memory",
    "offload_optimizer_config",
    "memory_efficient_linear",
)


def handle_zero(c, key: str, value: Any) -> None:
    """DeepSpeed `zero_optimization: {stage, cpu_offload, offload_optimizer: {device}, ...}`."""
    for raw, v in _mapping(c, key, value).items():
        k, shown = normalize_key(raw), f"{key}.{raw}"
        if k == "stage":
            c.set(("parallel", "zero_stage"), v, shown)
        elif k in ("cpu_offload", "cpu_offload_params"):
            if _bool(c, shown, v):
                c.set(("parallel", "cpu_offload"), True, shown, ident=("key", shown))
        elif k in ("offload_optimizer", "offload_param"):
            device = _mapping(c, shown, v).get("device", "none")
            if device == "cpu":
                c.set(("parallel", "cpu_offload"), True, shown, ident=("key", shown))
            elif device == "nvme":
                raise c.error(f"{shown}.device", "NVMe offload is not supported; use device: cpu")
            elif device not in ("none", None):
                raise c.error(f"{shown}.device", f"expected cpu or none, got {device!r}")
        elif k in _ZERO_TUNING:
            c.note(shown, _DEEPSPEED_COMM)
        else:
            raise c.error(
                shown,
                "unknown zero_optimization setting"
                + did_you_mean(k, ["stage", "cpu_offload", "offload_optimizer", "offload_param", *_ZERO_TUNING]),
            )


def handle_attention_config(c, key: str, value: Any) -> None:
    """GPT-NeoX `attention_config: [[["local", "global"], "all"]]` (or `[[["global"], 12]]`, or one name per
    layer) -> model.attention_types; the expansion needs num_layers, so it happens after merging (validate)."""
    if value is None:
        return
    if not isinstance(value, list):
        raise c.error(key, f'expected a list like [[["global"], 12]] or [[["local", "global"], "all"]], got {value!r}')
    # names are checked here, before the other keys' values, so that a gMLP / Mamba / RWKV config is refused
    # for what it is rather than for a value only those layers read
    for item in value:
        names = item[0] if isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)) else [item]
        for name in names:
            if isinstance(name, str) and type_problem(name):
                raise c.error(key, type_problem(name))
    c.set(("model", "attention_types"), value, key)


_GATED = {
    "gelu": "geglu",
    "relu": "reglu",
    "silu": "swiglu",
    "swish": "swiglu",
    "geglu": "geglu",
    "reglu": "reglu",
    "swiglu": "swiglu",
}


def handle_mlp_type(c, key: str, value: Any) -> None:
    """GPT-NeoX `mlp_type: llama` = a gated MLP whose gate uses `activation` (silu in LLaMA configs)."""
    if not isinstance(value, str) or value.lower() not in ("regular", "llama"):
        raise c.error(key, f"expected 'regular' or 'llama', got {value!r}")
    c.set(("_neox", "mlp_type"), value.lower(), key)


def handle_mlp_multiple_of(c, key: str, value: Any) -> None:
    """GPT-NeoX `mlp_multiple_of`: the derived MLP width is rounded up to a multiple of this."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise c.error(key, f"expected a positive integer, got {value!r}")
    c.set(("_neox", "mlp_multiple_of"), value, key)


def handle_expansion_factor(c, key: str, value: Any) -> None:
    """GPT-NeoX `expansion_factor`: MLP width = expansion_factor * hidden_size (unless intermediate_size is set)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise c.error(key, f"expected a positive number, got {value!r}")
    c.set(("_neox", "expansion_factor"), float(value), key)


def apply_pseudo_fields(merged: dict) -> dict:
    """Fold values that are not fields (`mlp_type`) into fields, after all sources are merged; returns the
    remaining ones that only feed derived defaults ({"mlp_multiple_of": 256})."""
    extras = {t[1]: merged.pop(t).value for t in [t for t in merged if t[0] == "_neox" and t[1] != "mlp_type"]}
    mlp = merged.pop(("_neox", "mlp_type"), None)
    if mlp is None or mlp.value != "llama":
        return extras
    act = merged.get(("model", "activation"))
    name = act.value if act is not None and isinstance(act.value, str) else "gelu"
    gated = _GATED.get(name.lower())
    if gated is None:
        raise ConfigError(
            f"{mlp.source}: key '{mlp.key}': mlp_type llama needs a gated form of activation {name!r}; "
            "use gelu, relu or silu"
        )
    src = act or mlp
    merged[("model", "activation")] = Assignment(
        ("model", "activation"), gated, f"{src.key} (with {mlp.key}: llama)", src.source, ("pseudo",)
    )
    return extras


# DeepSpeed's curriculum_learning block -> train.curriculum_* (schedule_config keys are DeepSpeed's).
_CURRICULUM = {
    "enabled": "curriculum_enabled",
    "curriculum_type": "curriculum_type",
    "min_difficulty": "curriculum_min_difficulty",
    "max_difficulty": "curriculum_max_difficulty",
    "schedule_type": "curriculum_schedule_type",
}
_CURRICULUM_SCHEDULE = {
    "total_curriculum_step": "curriculum_total_steps",
    "difficulty_step": "curriculum_difficulty_step",
    "root_degree": "curriculum_root_degree",
    "difficulty": "curriculum_difficulties",
    "max_step": "curriculum_max_steps",
}


def handle_curriculum(c, key: str, value: Any) -> None:
    """DeepSpeed `curriculum_learning: {enabled, curriculum_type, min_difficulty, max_difficulty, schedule_type,
    schedule_config: {total_curriculum_step, difficulty_step, root_degree, difficulty, max_step}}`."""
    if value is None:
        return
    for raw, v in _mapping(c, key, value).items():
        k, shown = normalize_key(raw), f"{key}.{raw}"
        if k in _CURRICULUM:
            c.set(("train", _CURRICULUM[k]), v, shown)
        elif k == "schedule_config":
            for raw2, v2 in _mapping(c, shown, v).items():
                k2, shown2 = normalize_key(raw2), f"{shown}.{raw2}"
                if k2 not in _CURRICULUM_SCHEDULE:
                    raise c.error(
                        shown2, "unknown schedule_config setting" + did_you_mean(k2, list(_CURRICULUM_SCHEDULE))
                    )
                c.set(("train", _CURRICULUM_SCHEDULE[k2]), v2, shown2)
        else:
            raise c.error(
                shown, "unknown curriculum_learning setting" + did_you_mean(k, [*_CURRICULUM, "schedule_config"])
            )


HANDLERS: dict[str, Callable] = {
    "curriculum_learning": handle_curriculum,
    "precision": handle_precision,
    "optimizer": handle_optimizer,
    "fp16": handle_fp16,
    "bf16": handle_bf16,
    "zero_optimization": handle_zero,
    "attention_config": handle_attention_config,
    "mlp_type": handle_mlp_type,
    "mlp_multiple_of": handle_mlp_multiple_of,
    "expansion_factor": handle_expansion_factor,
    "optimizer_type": handle_optimizer_type,
}
# Handlers that also take a mapping value where the key is a group name (`optimizer: {...}` is both forms).
HANDLER_TAKES_DICT = {"optimizer"}


# For docs/config.md: the structured GPT-NeoX keys that set each field (flat names and RENAMES are found
# automatically).
HANDLER_DOCS: dict[tuple[str, str], list[str]] = {
    ("precision", "precision"): ["precision: bfloat16|float16|float32", "fp16.enabled", "bf16.enabled"],
    ("precision", "loss_scale"): ["fp16.loss_scale (0 = dynamic)"],
    **{("precision", k): [f"fp16.{k}"] for k in _FP16_SCALER},
    ("optimizer", "type"): [
        "optimizer.type and optimizer_type (GPT-NeoX Adam/cpu_adam -> adamw, cpu_torch_adam -> adam)"
    ],
    **{("optimizer", k): [f"optimizer.params.{k}"] for k in ("lr", "betas", "eps", "weight_decay", "momentum")},
    ("parallel", "zero_stage"): ["zero_optimization.stage"],
    ("parallel", "cpu_offload"): [
        "zero_optimization.cpu_offload",
        "zero_optimization.offload_optimizer.device: cpu",
        "zero_optimization.offload_param.device: cpu",
    ],
    ("model", "activation"): ["mlp_type: llama (turns gelu/relu/silu into geglu/reglu/swiglu)"],
    ("model", "intermediate_size"): ["expansion_factor", "mlp_multiple_of"],
    ("model", "attention_types"): ["attention_config (expanded to one type per layer)"],
    **{("train", f): [f"curriculum_learning.{k}"] for k, f in _CURRICULUM.items()},
    **{("train", f): [f"curriculum_learning.schedule_config.{k}"] for k, f in _CURRICULUM_SCHEDULE.items()},
}
