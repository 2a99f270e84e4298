"""Config arithmetic: parameter counts of known models, the FLOPs formula, memory sharding rules."""

import subprocess
import sys

import pytest

from neox.config.schema import ModelConfig
from neox.model.info import flops_per_token, memory_per_rank, num_params

PYTHIA_160M = ModelConfig(
    num_layers=12,
    hidden_size=768,
    num_attention_heads=12,
    seq_length=2048,
    vocab_size=50304,
    rotary_pct=0.25,
    gpt_j_residual=True,
    no_weight_tying=True,
)
NEOX_20B = ModelConfig(
    num_layers=44,
    hidden_size=6144,
    num_attention_heads=64,
    seq_length=2048,
    vocab_size=50432,
    rotary_pct=0.25,
    gpt_j_residual=True,
    no_weight_tying=True,
)


def test_known_parameter_counts():
    assert num_params(PYTHIA_160M) == 162_322_944  # HF EleutherAI/pythia-160m
    assert num_params(NEOX_20B) == 20_554_567_680  # GPT-NeoX-20B paper / HF


def test_flops_per_token_formula():
    cfg = ModelConfig(
        num_layers=2, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=10, intermediate_size=16
    )
    # per layer: qkv 8*24+24, dense 8*8+8, mlp 8*16+16+16*8+8, 2 layernorms 2*16 = 600; head 10*8
    n_matmul = 2 * 600 + 80
    assert flops_per_token(cfg) == 6 * n_matmul + 12 * 2 * 8 * 4
    assert flops_per_token(cfg, seq_length=8) - flops_per_token(cfg) == 12 * 2 * 8 * 4


def test_memory_sharding_rules():
    base = memory_per_rank(PYTHIA_160M, micro_batch=2)
    n = num_params(PYTHIA_160M)
    assert base["params"] == base["grads"] == int(4 * n) and base["optimizer"] == int(8 * n)
    z1 = memory_per_rank(PYTHIA_160M, micro_batch=2, dp=4, zero_stage=1)
    z3 = memory_per_rank(PYTHIA_160M, micro_batch=2, dp=4, zero_stage=3)
    assert z1["optimizer"] == base["optimizer"] // 4 and z1["grads"] == base["grads"]
    assert z3["params"] == base["params"] // 4 and z3["grads"] == base["grads"] // 4
    tp = memory_per_rank(PYTHIA_160M, micro_batch=2, tp=2)
    assert tp["params"] == base["params"] // 2 and tp["activations"] == base["activations"] // 2
    pp = memory_per_rank(PYTHIA_160M, micro_batch=2, pp=2)
    # half the layers, but 1F1B's first stage holds 2 micro-batches: the same activation bytes
    assert pp["params"] == base["params"] // 2 and pp["activations"] == base["activations"]
    pure = memory_per_rank(PYTHIA_160M, micro_batch=2, precision="bf16", bf16_mode="pure")
    assert pure["params"] == base["params"] // 2
    ckpt = memory_per_rank(PYTHIA_160M, micro_batch=2, checkpoint_activations=True)
    assert ckpt["activations"] < base["activations"]
    assert base["total"] == sum(v for k, v in base.items() if k != "total")


def test_info_module_does_not_import_torch():
    code = "import sys, neox.model.info, neox.model; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_vocab_is_a_config_error():
    from neox.errors import ConfigError

    with pytest.raises(ConfigError, match="vocab_size"):
        num_params(ModelConfig())
