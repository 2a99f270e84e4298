"""RoPE scaling through transformers: Llama-3-style (and every other method) exported and imported with the
logits transformers computes, config.json in both the 5.x and 4.x spellings, one-line refusals."""

import json

import pytest

import neox
from neox.errors import NeoxError
from neox.infer.api import checkpoint_config
from neox.interop.hf import export_model, import_hf
from neox.interop.hf_mapping import from_hf_config
from neox.train.checkpoint import resolve
from tests.infer.tiny import random_model, tiny_config
from tests.interop import hf_tiny
from tests.interop.hf_tiny import transformers

LLAMA3 = {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0}  # fmt: skip
SCALINGS = {
    "llama3": LLAMA3,
    "linear": {"type": "linear", "factor": 4.0},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0},
    "dynamic": {"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32},
}
IDS = hf_tiny.random_ids(2, 100, seed=3)  # past the original 32


@pytest.mark.parametrize(
    "kind, arch", [(k, "llama") for k in SCALINGS] + [("yarn", "gpt_neox"), ("dynamic", "gpt_neox")]
)
def test_export_with_rope_scaling_matches_transformers(kind, arch, tmp_path):
    extra = hf_tiny.LLAMA_LIKE if arch == "llama" else {"rotary_pct": 0.5}
    cfg = tiny_config(**extra, rope_scaling=SCALINGS[kind], max_position_embeddings=128)
    model = random_model(cfg)
    hf = hf_tiny.export_and_load(cfg, model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == kind and config["rope_scaling"]["type"] == kind
    # transformers' dynamic NTK grows past its max_position_embeddings: neox's original context
    assert config["max_position_embeddings"] == (32 if kind == "dynamic" else 128)
    assert hf_tiny.logits_gap(model, hf, IDS) < 1e-4


def test_llama3_checkpoint_imports_with_matching_logits_and_exports_back(tmp_path):
    conf = transformers.LlamaConfig(
        **hf_tiny.HF_TINY,
        num_key_value_heads=2,
        intermediate_size=160,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )  # fmt: skip
    hf = hf_tiny.random_hf(transformers.LlamaForCausalLM, conf)
    run = import_hf(hf_tiny.save_hf(hf, tmp_path / "hf"), tmp_path / "run")
    model, _ = neox.load(run)
    cfg = checkpoint_config(resolve(run))
    m = cfg.model
    assert m.rope_scaling == {**LLAMA3, "type": "llama3"} and m.rotary_emb_base == 500000
    assert hf_tiny.logits_gap(model, hf, IDS) < 1e-4
    export_model(cfg, model.state_dict(), None, tmp_path / "b")
    back = hf_tiny.load_hf(tmp_path / "b")
    assert back.config.rope_parameters["rope_type"] == "llama3"
    assert hf_tiny.logits_gap(model, back, IDS) < 1e-4


def _config_dir(tmp_path, **config):
    d = tmp_path / "hfcfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return transformers.AutoConfig.from_pretrained(d, local_files_only=True)


BASE = dict(hf_tiny.HF_TINY, num_key_value_heads=4, intermediate_size=128)


@pytest.mark.parametrize(
    "model_type, rope_scaling, want",
    [
        ("llama", {"type": "linear", "factor": 2.0}, {"rope_scaling": {"type": "linear", "factor": 2.0}}),
        (
            "gpt_neox",
            {"type": "dynamic", "factor": 2.0},
            {
                "rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 512},
                "max_position_embeddings": 1024,
            },
        ),
        (
            "mistral",
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
            {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
        ),
        (
            "llama",
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
            {
                "rope_scaling": {
                    "type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 512,
                },
            },
        ),
    ],
)
def test_any_config_with_rope_scaling_imports(model_type, rope_scaling, want, tmp_path):
    hf = _config_dir(
        tmp_path,
        model_type=model_type,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        **BASE,
    )
    fields = from_hf_config(hf)
    got = {k: fields[k] for k in want}
    got["rope_scaling"] = {k: v for k, v in got["rope_scaling"].items() if k in want["rope_scaling"] or k == "type"}
    assert got == want
    cfg = neox.config.from_dict({"model": fields})  # and it validates as a neox config
    assert cfg.model.rope_scaling["type"] == want["rope_scaling"]["type"]


def test_rope_types_neox_cannot_express_are_one_line(tmp_path):
    hf = _config_dir(
        tmp_path,
        model_type="llama",
        max_position_embeddings=512,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                      "original_max_position_embeddings": 256},
        **BASE,
    )  # fmt: skip
    with pytest.raises(NeoxError, match="rope_type='longrope'") as e:
        from_hf_config(hf)
    assert "\n" not in str(e.value)
