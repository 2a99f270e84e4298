"""Mistral-style models (sliding window + grouped-query attention) to and from transformers'
MistralForCausalLM: logits within and past the window, import with the window's off-by-one, refusals."""

import json

import pytest

import neox
from neox.infer.api import checkpoint_config
from neox.interop.hf import import_hf
from neox.interop.hf_mapping import ExportError, from_hf_config, hf_architecture
from neox.train.checkpoint import resolve
from tests.infer.tiny import random_model, tiny_config
from tests.interop import hf_tiny
from tests.interop.hf_tiny import transformers

# each token sees itself and 15 before it: transformers' sliding_window 16
MISTRAL_LIKE = dict(hf_tiny.LLAMA_LIKE, sliding_window_width=15)


def _gap(model, hf, t):
    return hf_tiny.logits_gap(model, hf, hf_tiny.random_ids(2, t, seed=t))


def test_export_to_mistral_matches_logits_within_and_past_the_window(tmp_path):
    cfg = tiny_config(**MISTRAL_LIKE)
    model = random_model(cfg)
    hf = hf_tiny.export_and_load(cfg, model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sliding_window"] == 16 and config["num_key_value_heads"] == 2
    assert type(hf).__name__ == "MistralForCausalLM"
    assert _gap(model, hf, 12) < 1e-4  # shorter than the window
    assert _gap(model, hf, 64) < 1e-4  # four windows long: the window decides what is seen


def test_mistral_checkpoint_imports_with_its_window(tmp_path):
    conf = transformers.MistralConfig(
        **hf_tiny.HF_TINY,
        num_key_value_heads=1,
        intermediate_size=160,
        max_position_embeddings=128,
        sliding_window=8,
        rms_norm_eps=1e-5,
    )
    hf = hf_tiny.random_hf(transformers.MistralForCausalLM, conf)
    run = import_hf(hf_tiny.save_hf(hf, tmp_path / "hf"), tmp_path / "run")
    m = checkpoint_config(resolve(run)).model
    assert (m.sliding_window_width, m.num_kv_heads, m.use_bias_in_attn_linear) == (7, 1, False)
    model, _ = neox.load(run)
    assert _gap(model, hf, 40) < 1e-4


def test_mistral_without_a_window_imports_as_global_attention(tmp_path):
    conf = transformers.MistralConfig(
        vocab_size=384, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, sliding_window=None,
    )  # fmt: skip
    assert from_hf_config(conf)["sliding_window_width"] is None


@pytest.mark.parametrize(
    "over, named",
    [
        (
            {"use_bias_in_attn_linear": True},
            "model.use_bias_in_attn_linear=True cannot be exported to MistralForCausalLM",
        ),
        ({"use_bias_in_mlp": True}, "model.use_bias_in_mlp"),
        ({"norm": "layernorm", "use_bias_in_norms": True}, "model.norm='layernorm'"),
        ({"use_mup": True}, "model.use_mup=True cannot be exported"),
        ({"use_qk_layernorm": True}, "model.use_qk_layernorm"),
    ],
)
def test_what_mistral_cannot_express_is_refused_by_name(over, named):
    cfg = tiny_config(**{**MISTRAL_LIKE, **over})
    with pytest.raises(ExportError, match=named.replace("(", r"\(")) as e:
        hf_architecture(cfg.model)
    assert "\n" not in str(e.value)
