"""Cross-field rules, the batch triple and the padded vocabulary."""

from __future__ import annotations

import pytest

from neox.config import from_dict, resolve_batch, resolve_vocab
from neox.config.validate import split_proportions
from neox.errors import ConfigError


@pytest.mark.parametrize(
    "given, dp, expected",
    [
        ({"train_micro_batch_size_per_gpu": 4}, 2, (4, 1, 8)),
        ({"train_micro_batch_size_per_gpu": 4, "gas": 3}, 2, (4, 3, 24)),
        ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4}, 2, (4, 3, 24)),
        ({"train_batch_size": 24, "gradient_accumulation_steps": 3}, 2, (4, 3, 24)),
        ({"train_batch_size": 24}, 4, (6, 1, 24)),
        ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gas": 3}, 2, (4, 3, 24)),
        ({"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 32}, 32, (32, 1, 1024)),
        ({"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 32}, 8, (32, 4, 1024)),
    ],
)
def test_resolve_batch_from_any_two(given, dp, expected):
    assert resolve_batch(from_dict(given), dp) == expected


def test_inconsistent_batch_triple_names_the_keys():
    cfg = from_dict({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gas": 3})
    with pytest.raises(
        ConfigError,
        match=r"train_batch_size / train_micro_batch_size_per_gpu / "
        r"gradient_accumulation_steps: inconsistent: micro 4 x accum 3 x data-parallel 4",
    ):
        resolve_batch(cfg, 4)
    with pytest.raises(ConfigError, match=r"key 'train_batch_size': 24 is not divisible by micro 3 x data-parallel 5"):
        resolve_batch(from_dict({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3}), 5)
    with pytest.raises(ConfigError, match=r"the batch size is not set"):
        resolve_batch(from_dict({}), 1)
    # what can be checked without the data-parallel size is checked at load, naming the file
    with pytest.raises(
        ConfigError,
        match=r"b\.yml: key 'train_batch_size': 10 is not a multiple of "
        r"train_micro_batch_size_per_gpu 4",
    ):
        from_dict({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, "b.yml")


def test_resolve_vocab_pads_or_checks():
    cfg = from_dict({})
    assert resolve_vocab(cfg, 50277) == 50304 and cfg.model.vocab_size == 50304
    assert resolve_vocab(from_dict({}), 50277, tp=2) == 50432
    assert resolve_vocab(from_dict({"make_vocab_size_divisible_by": 1}), 4093) == 4093
    assert resolve_vocab(from_dict({"model": {"vocab_size": 60000}}), 50277) == 60000
    with pytest.raises(ConfigError, match=r"key 'model.vocab_size': 50000 is smaller than the tokenizer's"):
        resolve_vocab(from_dict({"model": {"vocab_size": 50000}}), 50277)
    with pytest.raises(ConfigError, match=r"not divisible by the tensor-parallel size 4"):
        resolve_vocab(from_dict({"model": {"vocab_size": 50306}}), 50277, tp=4)


def test_intermediate_size_rules():
    def width(**kw):
        return from_dict({"num_attention_heads": 4, "pos_emb": "learned", **kw}).model.intermediate_size

    assert width(hidden_size=768) == 3072
    assert width(hidden_size=4096, activation="swiglu") == 11008  # LLaMA-7B
    assert width(hidden_size=2048, activation="swiglu") == 5632  # LLaMA-style 1B
    assert width(hidden_size=100, mlp_multiple_of=64) == 448
    assert width(hidden_size=100, activation="swiglu", expansion_factor=3) == 300
    assert width(hidden_size=4096, activation="swiglu", mlp_multiple_of=1) == 10922  # GPT-NeoX default rounding
    assert width(hidden_size=64, intermediate_size=100) == 100


@pytest.mark.parametrize(
    "given, message",
    [
        (
            {"hidden_size": 100, "num_attention_heads": 3},
            r"c\.yml: key 'num_attention_heads': 3 heads do not divide hidden_size 100 \(set in c\.yml: key 'hidden_size'\)",
        ),
        ({"num_attention_heads": 4, "num_kv_heads": 3}, r"key 'num_kv_heads': 3 key/value heads do not divide"),
        ({"rotary_pct": 0}, r"key 'rotary_pct': must be in \(0, 1\], got 0.0"),
        (
            {"hidden_size": 100, "num_attention_heads": 4},
            r"key 'hidden_size': rotary would rotate 25 of each head's 25",
        ),
        (
            {"rotary_pct": 0.125, "hidden_size": 96, "num_attention_heads": 4},
            r"key 'rotary_pct': rotary would rotate 3 of each head's 24",
        ),
        ({"rotary_pct": 1.5}, r"key 'rotary_pct': must be in \(0, 1\]"),
        (
            {"seq_length": 256, "max_position_embeddings": 128},
            r"key 'max_position_embeddings': 128 is shorter than seq_length 256",
        ),
        ({"num_layers": 0}, r"key 'num_layers': must be at least 1, got 0"),
        ({"hidden_dropout": 1.0}, r"key 'hidden_dropout': must be in \[0, 1\)"),
        (
            {"model_parallel_size": 3},
            r"key 'model_parallel_size': tensor-parallel size 3 does not divide num_attention_heads 4",
        ),
        (
            {"pipe_parallel_size": 3, "num_layers": 2},
            r"key 'pipe_parallel_size': 3 stages x 1 per rank is more than num_layers 2",
        ),
        ({"betas": [0.9]}, r"key 'betas': expected two numbers in \[0, 1\)"),
        ({"min_lr": 0.1, "lr": 0.01}, r"key 'min_lr': 0.1 is above the peak lr 0.01"),
        ({"gpt_j_tied": True}, r"key 'gpt_j_tied': needs gpt_j_residual: true"),
        ({"train_data_paths": ["a", "b"], "train_data_weights": [1]}, r"key 'train_data_weights': 1 weights for 2"),
        ({"split": "90,x"}, r"key 'split': expected up to three non-negative numbers"),
        ({"zero_optimization": {"stage": 4}}, r"key 'zero_optimization.stage': 4 is not one of 0, 1, 2, 3"),
    ],
)
def test_impossible_combinations_name_file_and_key(given, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(given, "c.yml")


def test_errors_name_the_file_that_set_the_value(tmp_path):
    from neox.config import load

    a = tmp_path / "a.yml"
    a.write_text("hidden_size: 100\n")
    b = tmp_path / "b.yml"
    b.write_text("num-attention-heads: 3\n")
    with pytest.raises(
        ConfigError,
        match=rf"{b}: key 'num-attention-heads': 3 heads do not divide hidden_size 100 "
        rf"\(set in {a}: key 'hidden_size'\)",
    ):
        load([str(a), str(b)])


def test_split_proportions():
    assert split_proportions("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert split_proportions("1") == [1.0, 0.0, 0.0]
    assert split_proportions("98/2/0") == pytest.approx([0.98, 0.02, 0.0])
