"""Every ready config in configs/ loads and validates; the Pythia and NeoX-20B shapes have their published sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from neox.config import load, resolve_batch, resolve_vocab
from neox.config.loader import resolve

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(p.name for p in CONFIGS.glob("*.yml"))

# Total parameters of the Pythia suite (EleutherAI/pythia README). The vocabulary is padded to a multiple of
# 128 x tensor-parallel size, which is why 6.9B (tp 2: 50432) and 12B (tp 4: 50688) differ from the rest (50304).
PUBLISHED = {
    "pythia-14m.yml": 14_067_712,
    "pythia-31m.yml": 30_494_720,
    "pythia-70m.yml": 70_426_624,
    "pythia-160m.yml": 162_322_944,
    "pythia-410m.yml": 405_334_016,
    "pythia-1b.yml": 1_011_781_632,
    "pythia-1.4b.yml": 1_414_647_808,
    "pythia-2.8b.yml": 2_775_208_960,
    "pythia-6.9b.yml": 6_857_302_016,
    "pythia-12b.yml": 11_846_072_320,
}


def test_the_expected_configs_are_there():
    expected = {f"pythia-{s}.yml" for s in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")}
    expected |= {"neox-20b.yml", "gpt3-125m.yml", "llama-style.yml", "tiny-cpu.yml", "tiny-cpu-llama.yml"}
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_ready_config_loads_and_validates(name):
    r = resolve([str(CONFIGS / name)], training=True)
    cfg = r.config
    assert cfg.data.data_path or cfg.data.train_data_paths
    micro, accum, total = resolve_batch(cfg, 1)
    assert micro * accum == total
    for note in r.notes:  # only the documented no-effect keys, never an unknown one
        assert "has no effect here" in note


@pytest.mark.parametrize("name, params", sorted(PUBLISHED.items()))
def test_pythia_shapes_match_published_sizes(name, params):
    from neox.model import num_params

    cfg = load([str(CONFIGS / name)])
    tp = cfg.parallel.model_parallel_size
    resolve_vocab(cfg, 50277, tp=tp)
    assert cfg.model.vocab_size == {1: 50304, 2: 50432, 4: 50688}[tp]
    assert num_params(cfg.model) == params
    assert cfg.optimizer.type == "adamw" and cfg.precision.precision == "fp16"
    assert resolve_batch(cfg, 1024 // cfg.train.train_micro_batch_size_per_gpu)[2] == 1024


def test_neox_20b_and_llama_style_shapes():
    cfg = load([str(CONFIGS / "neox-20b.yml")])
    resolve_vocab(cfg, 50277, tp=cfg.parallel.model_parallel_size)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (44, 6144, 64)
    assert cfg.model.vocab_size == 50432  # padded to 128 x tp 2, the released 20B vocabulary
    assert (cfg.parallel.pipe_parallel_size, cfg.parallel.model_parallel_size) == (4, 2)
    llama = load([str(CONFIGS / "llama-style.yml")]).model
    assert (llama.norm, llama.activation, llama.pos_emb, llama.num_kv_heads) == ("rmsnorm", "swiglu", "rotary", 4)
    assert llama.no_weight_tying and not (
        llama.use_bias_in_attn_linear or llama.use_bias_in_mlp or llama.use_bias_in_norms
    )
    assert llama.intermediate_size == 2048


def test_tiny_cpu_is_what_make_train_expects():
    cfg = load([str(CONFIGS / "tiny-cpu.yml")], training=True)
    assert cfg.data.data_path == "data/stdlib/stdlib_text_document"
    assert (cfg.tokenizer.tokenizer_type, cfg.tokenizer.vocab_file) == ("HFTokenizer", "data/stdlib/tokenizer.json")
    assert cfg.checkpoint.save == "runs/tiny-cpu"
    makefile = (CONFIGS.parent / "Makefile").read_text()
    assert "configs/tiny-cpu.yml" in makefile and "runs/tiny-cpu" in makefile
    # the configs state the size the Makefile trains the tokenizer to (a trained BPE has at most that many)
    assert f"--vocab-size {cfg.model.vocab_size} --out data/stdlib/tokenizer.json" in makefile
    assert load([str(CONFIGS / "tiny-cpu-llama.yml")]).model.vocab_size == cfg.model.vocab_size
