"""Every GPT-NeoX key the issue names maps to our field, and every key in the alias tables is handled."""

from __future__ import annotations

import pytest

from neox.config import aliases, from_dict, load, resolve_vocab
from neox.config.loader import resolve
from neox.errors import ConfigError


@pytest.mark.parametrize(
    "neox, path, expected",
    [
        ({"num-layers": 3}, "model.num_layers", 3),
        ({"hidden_size": 96}, "model.hidden_size", 96),
        ({"pos-emb": "learned"}, "model.pos_emb", "learned"),
        ({"train_micro_batch_size_per_gpu": 4}, "train.train_micro_batch_size_per_gpu", 4),
        ({"batch_size": 4}, "train.train_micro_batch_size_per_gpu", 4),
        ({"gas": 3}, "train.gradient_accumulation_steps", 3),
        ({"gradient_accumulation_steps": 3}, "train.gradient_accumulation_steps", 3),
        ({"train_batch_size": 12}, "train.train_batch_size", 12),
        ({"precision": "bfloat16"}, "precision.precision", "bf16"),
        ({"precision": "float16"}, "precision.precision", "fp16"),
        ({"precision": "float32"}, "precision.precision", "fp32"),
        ({"precision": "fp16"}, "precision.precision", "fp16"),
        ({"bf16": {"enabled": True}}, "precision.precision", "bf16"),
        ({"bf16": {"enabled": False}}, "precision.precision", "fp32"),
        ({"fp16": {"enabled": True}}, "precision.precision", "fp16"),
        ({"fp16": {"enabled": True, "type": "bfloat16"}}, "precision.precision", "bf16"),
        ({"fp16": {"enabled": True, "loss_scale": 0}}, "precision.loss_scale", None),
        ({"fp16": {"enabled": True, "loss_scale": 128}}, "precision.loss_scale", 128.0),
        ({"fp16": {"enabled": True, "initial_scale_power": 12}}, "precision.initial_scale_power", 12),
        ({"fp16": {"enabled": True, "loss_scale_window": 500}}, "precision.loss_scale_window", 500),
        ({"fp16": {"enabled": True, "hysteresis": 4}}, "precision.hysteresis", 4),
        ({"fp16": {"enabled": True, "min_loss_scale": 2}}, "precision.min_loss_scale", 2.0),
        ({"min_scale": 4}, "precision.min_loss_scale", 4.0),
        ({"zero_optimization": {"stage": 3}}, "parallel.zero_stage", 3),
        ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, "parallel.cpu_offload", True),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "parallel.cpu_offload", True),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}, "parallel.cpu_offload", False),
        ({"zero_stage": 1}, "parallel.zero_stage", 1),
        ({"optimizer": {"type": "Adam", "params": {"lr": 0.01}}}, "optimizer.type", "adamw"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}, "optimizer.type", "adamw"),
        ({"optimizer": {"type": "cpu_torch_adam", "params": {}}}, "optimizer.type", "adam"),
        ({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}, "optimizer.momentum", 0.9),
        ({"optimizer": {"type": "adam"}}, "optimizer.type", "adam"),  # our own nested form: torch Adam
        ({"optimizer_type": "adam"}, "optimizer.type", "adamw"),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-6}}},
            "optimizer.betas",
            [0.9, 0.99],
        ),
        ({"optimizer": {"type": "Adam", "params": {"eps": 1.0e-6}}}, "optimizer.eps", 1e-6),
        ({"optimizer": {"type": "Adam", "params": {"weight_decay": 0.05}}}, "optimizer.weight_decay", 0.05),
        ({"weight-decay": 0.1}, "optimizer.weight_decay", 0.1),
        ({"lr": 0.002}, "optimizer.lr", 0.002),
        ({"gradient_clipping": 0.5}, "train.gradient_clipping", 0.5),
        ({"clip_grad": 0.5}, "train.gradient_clipping", 0.5),
        ({"checkpoint_factor": 250}, "checkpoint.save_interval", 250),
        ({"checkpoint-factor": 250}, "checkpoint.save_interval", 250),
        ({"save-interval": 250}, "checkpoint.save_interval", 250),
        ({"extra-save-iters": [1, 2]}, "checkpoint.extra_save_iters", [1, 2]),
        ({"lr_decay_style": "linear"}, "schedule.lr_decay_style", "linear"),
        ({"lr-decay-iters": 900}, "schedule.lr_decay_iters", 900),
        ({"warmup": 0.05}, "schedule.warmup", 0.05),
        ({"min_lr": 1e-5}, "schedule.min_lr", 1e-5),
        ({"lr_decay_fraction": 0.8}, "schedule.lr_decay_fraction", 0.8),
        ({"pipe-parallel-size": 0}, "parallel.pipe_parallel_size", 1),
        ({"pipe-parallel-size": 2}, "parallel.pipe_parallel_size", 2),
        ({"pipe_partition_method": "type:transformer|mlp"}, "parallel.pipe_partition_method", "uniform"),
        ({"model-parallel-size": 2}, "parallel.model_parallel_size", 2),
        ({"sequence_parallel": True}, "parallel.sequence_parallel", True),
        ({"mlp_type": "llama", "activation": "silu"}, "model.activation", "swiglu"),
        ({"mlp_type": "llama"}, "model.activation", "geglu"),
        ({"mlp_type": "regular", "activation": "relu"}, "model.activation", "relu"),
        (
            {"mlp_type": "llama", "activation": "silu", "hidden_size": 4096, "num_attention_heads": 32},
            "model.intermediate_size",
            11008,
        ),
        (
            {
                "mlp_type": "llama",
                "activation": "silu",
                "mlp_multiple_of": 1,
                "hidden_size": 96,
                "num_attention_heads": 4,
            },
            "model.intermediate_size",
            256,
        ),
        ({"expansion_factor": 2, "hidden_size": 96, "num_attention_heads": 4}, "model.intermediate_size", 192),
        ({"feedforward_size": 200}, "model.intermediate_size", 200),
        ({"use_bias_in_attn_linear": False}, "model.use_bias_in_attn_linear", False),
        ({"use_bias_in_mlp": False}, "model.use_bias_in_mlp", False),
        ({"use_bias_in_norms": False}, "model.use_bias_in_norms", False),
        ({"num_kv_heads": 2}, "model.num_kv_heads", 2),
        ({"rotary_pct": 0.25}, "model.rotary_pct", 0.25),
        ({"no-weight-tying": True}, "model.no_weight_tying", True),
        ({"gpt_j_residual": True}, "model.gpt_j_residual", True),
        ({"seed": 7}, "train.seed", 7),
        ({"train-iters": 10}, "train.train_iters", 10),
        ({"checkpoint-activations": True}, "train.checkpoint_activations", True),
        ({"eval-interval": 5}, "eval.eval_interval", 5),
        ({"eval-iters": 2}, "eval.eval_iters", 2),
        ({"eval_tasks": ["lambada_openai"]}, "eval.eval_tasks", ["lambada_openai"]),
        ({"log-interval": 3}, "logging.log_interval", 3),
        ({"log-dir": "logs"}, "logging.log_dir", "logs"),
        ({"tensorboard-dir": "tb"}, "logging.tensorboard_dir", "tb"),
        ({"use_wandb": True}, "logging.use_wandb", True),
        ({"wandb_project": "p"}, "logging.wandb_project", "p"),
        ({"wandb_group": "g"}, "logging.wandb_group", "g"),
        ({"data-path": "d/x_text_document"}, "data.data_path", "d/x_text_document"),
        ({"train-data-paths": ["a", "b"]}, "data.train_data_paths", ["a", "b"]),
        ({"train_data_paths": "a"}, "data.train_data_paths", ["a"]),
        ({"valid-data-paths": ["v"]}, "data.valid_data_paths", ["v"]),
        ({"test-data-paths": ["t"]}, "data.test_data_paths", ["t"]),
        ({"train_label_data_paths": ["l"], "train_data_paths": ["t"]}, "data.label_data_paths", ["l"]),
        ({"train_data_weights": [1, 3], "train_data_paths": ["a", "b"]}, "data.train_data_weights", [1, 3]),
        ({"data-impl": "infer"}, "data.data_impl", "mmap"),
        ({"split": "949,50,1"}, "data.split", "949,50,1"),
        ({"eod_mask_loss": True}, "data.eod_mask_loss", True),
        ({"vocab-file": "v.json"}, "tokenizer.vocab_file", "v.json"),
        ({"merge-file": "m.txt"}, "tokenizer.merge_file", "m.txt"),
        ({"tokenizer_type": "HFTokenizer"}, "tokenizer.tokenizer_type", "HFTokenizer"),
        ({"save": "ckpt"}, "checkpoint.save", "ckpt"),
        ({"load": "ckpt"}, "checkpoint.load", "ckpt"),
        ({"finetune": True}, "checkpoint.finetune", True),
        ({"keep-last-n-checkpoints": 3}, "checkpoint.keep_last_n_checkpoints", 3),
        ({"temperature": 0.5}, "generation.temperature", 0.5),
        ({"maximum_tokens": 8}, "generation.maximum_tokens", 8),
    ],
)
def test_gpt_neox_key_maps_to_field(neox, path, expected):
    group, name = path.split(".")
    assert getattr(getattr(from_dict(neox), group), name) == expected


@pytest.mark.parametrize(
    "key",
    [
        "scaled_upper_triang_masked_softmax_fusion",
        "scaled-masked-softmax-fusion",
        "bias_gelu_fusion",
        "bias-dropout-fusion",
        "rope_fusion",
    ],
)
def test_fusion_flags_accepted_with_a_note(key):
    r = resolve(dicts=[({key: True}, "f.yml")])
    assert r.notes == [f"f.yml: key '{key}' has no effect here: {aliases.NO_EFFECT[key.replace('-', '_')]}"]
    assert "scaled_dot_product_attention" in r.notes[0]


def test_deepspeed_checkpoint_block_in_our_checkpoint_group():
    r = resolve(dicts=[({"checkpoint": {"tag_validation": "Warn", "save": "ck"}}, "d.yml")])
    assert r.config.checkpoint.save == "ck"
    assert r.notes == [
        "d.yml: key 'checkpoint.tag_validation' has no effect here: "
        + aliases.GROUP_NO_EFFECT[("checkpoint", "tag_validation")]
    ]


@pytest.mark.parametrize(
    "given, expected",
    [("Lion", "lion"), ("sm3", "sm3"), ("MADGRAD_WD", "madgrad_wd"), ("Adafactor", "adafactor"), ("muon", "muon")],
)
def test_gpt_neox_optimizer_names_load_case_insensitively(given, expected):
    for form in ({"optimizer": {"type": given, "params": {"lr": 1e-3}}}, {"optimizer": {"type": given}}):
        assert from_dict(form, "o.yml").optimizer.type == expected


@pytest.mark.parametrize(
    "given, expected, compression",
    [("cpu_adam", "adamw", "none"), ("cpu_torch_adam", "adam", "none"), ("OneBitAdam", "adamw", "onebit")],
)
def test_gpt_neox_only_optimizer_names_mean_the_same_in_our_form_and_in_set(given, expected, compression):
    """`optimizer: {type: cpu_adam}` (no params) and `--set optimizer.type=cpu_adam` read GPT-NeoX's names as the
    GPT-NeoX form does; names both have (adam) keep our meaning there."""
    for cfg in (
        from_dict({"optimizer": {"type": given}}, "o.yml"),
        resolve(overrides=[f"optimizer.type={given}"]).config,
    ):
        assert (cfg.optimizer.type, cfg.parallel.grad_compression) == (expected, compression)
    assert resolve(overrides=["optimizer.type=adam"]).config.optimizer.type == "adam"


def test_one_bit_adam_is_adamw_with_the_onebit_hook_and_its_freeze_step():
    r = resolve(
        dicts=[({"optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 23, "cuda_aware": False}}}, "o.yml")]
    )
    cfg = r.config
    assert (cfg.optimizer.type, cfg.parallel.grad_compression, cfg.parallel.grad_compression_start_iter) == (
        "adamw",
        "onebit",
        23,
    )
    assert any("cuda_aware" in n for n in r.notes)


@pytest.mark.parametrize(
    "neox, message",
    [
        ({"s3_path": "s3://x"}, r"key 's3_path': not supported: neox does not upload"),
        ({"moe_type": "deepspeed"}, r"key 'moe_type': unsupported value 'deepspeed': only the dropless"),
        ({"optimizer_type": "lamb"}, r"key 'optimizer_type': 'lamb' is not one of 'adam', 'adamw', 'sgd', 'lion'"),
        ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}}, r"unknown optimizer parameter"),
        ({"tokenizer_type": "HFGPT2Tokenizer"}, r"unsupported value 'HFGPT2Tokenizer': use GPT2BPETokenizer"),
        ({"zero_optimization": {"offload_param": {"device": "nvme"}}}, r"NVMe offload is not supported"),
        ({"fp16": {"enabled": True, "consecutive_hysteresis": True}}, r"consecutive_hysteresis"),
        ({"mlp_type": "moe"}, r"key 'mlp_type': expected 'regular' or 'llama'"),
        ({"mlp_type": "llama", "activation": "mish"}, r"mlp_type llama needs a gated form of activation 'mish'"),
        ({"use_checkpoint_lr_scheduler": True}, r"the schedule is always recomputed from the config"),
    ],
)
def test_unsupported_keys_and_values_are_rejected_with_reason(neox, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(neox, "n.yml")


def test_every_table_key_is_handled():
    """Each NO_EFFECT key loads with a note, each ONLY_DEFAULT key loads at its off value and is rejected
    otherwise, each REJECTED key is rejected: no key is silently ignored."""
    for key, reason in aliases.NO_EFFECT.items():
        r = resolve(dicts=[({key: 1}, "t.yml")])
        assert r.notes == [f"t.yml: key '{key}' has no effect here: {reason}"], key
    for key, (allowed, _reason) in aliases.ONLY_DEFAULT.items():
        for value in allowed:
            assert len(resolve(dicts=[({key: value}, "t.yml")]).notes) == 1, key
        with pytest.raises(ConfigError, match=rf"key '{key}': unsupported value"):
            from_dict({key: "something else"}, "t.yml")
    for key in aliases.REJECTED:
        with pytest.raises(ConfigError, match=rf"key '{key}': not supported: "):
            from_dict({key: 1}, "t.yml")
    tables = [
        set(aliases.NO_EFFECT),
        set(aliases.ONLY_DEFAULT),
        set(aliases.REJECTED),
        set(aliases.RENAMES),
        set(aliases.HANDLERS),
    ]
    for i, a in enumerate(tables):
        for b in tables[i + 1 :]:
            assert not a & b, a & b  # every key in exactly one table
    from neox.config.loader import FLAT

    for t in tables:  # a schema field must never be shadowed by (or shadow) a GPT-NeoX table entry
        assert not (set(FLAT) & t) - {"precision"}, set(FLAT) & t  # precision's handler sets that very field


def test_gpt_neox_llama_model_plus_train_config(tmp_path):
    """GPT-NeoX splits LLaMA into a model file and a train file; merged they give the LLaMA-7B shapes."""
    model = tmp_path / "7B.yml"
    model.write_text("""{
  "pipe-parallel-size": 1, "model-parallel-size": 1, "make_vocab_size_divisible_by": 1,
  "num-layers": 32, "hidden-size": 4096, "num-attention-heads": 32, "seq-length": 2048,
  "max-position-embeddings": 2048, "pos-emb": "rotary", "rotary-pct": 1, "no-weight-tying": true,
  "gpt-j-residual": false, "output-layer-parallelism": "column", "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-6,
  "scaled-upper-triang-masked-softmax-fusion": true, "bias-gelu-fusion": false,
  "use_bias_in_norms": false, "use_bias_in_attn_linear": false, "mlp_type": "llama", "activation": "silu",
}""")
    train = tmp_path / "train_config.yml"
    train.write_text("""{
  "finetune": true, "optimizer": {"type": "Adam", "params": {"lr": 0.0002, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "min_lr": 0.00002, "override_lr_scheduler": true, "train_micro_batch_size_per_gpu": 4,
  "checkpoint_activations": true, "checkpoint_num_layers": 1, "partition_activations": true,
  "fp16": {"fp16": true, "enabled": true, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2,
           "min_loss_scale": 1},
  "train_iters": 320000, "lr_decay_iters": 320000, "lr_decay_style": "cosine", "warmup": 0.01,
  "checkpoint_factor": 10000, "keep_last_n_checkpoints": 4, "mlp_multiple_of": 256,
}""")
    cfg = load([str(model), str(train)])
    m = cfg.model
    assert (m.activation, m.intermediate_size, m.norm, m.rms_norm_epsilon) == ("swiglu", 11008, "rmsnorm", 1e-6)
    assert not (m.use_bias_in_norms or m.use_bias_in_attn_linear) and m.no_weight_tying
    assert resolve_vocab(cfg, 32000) == 32000  # make_vocab_size_divisible_by: 1 keeps LLaMA's vocabulary
    assert cfg.checkpoint.finetune and cfg.checkpoint.save_interval == 10000
    assert (cfg.optimizer.type, cfg.precision.precision) == ("adamw", "fp16")
