"""Loading, merging and overriding configs; duplicate keys; error messages that name file and key."""

from __future__ import annotations

import pytest
import yaml

from neox.config import from_dict, load, to_dict
from neox.config.loader import resolve
from neox.config.schema import Config
from neox.errors import ConfigError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_derive_and_round_trip():
    cfg = from_dict(
        {
            "hidden_size": 96,
            "num_attention_heads": 3,
            "seq_length": 64,
            "train_data_weights": [1, 2],
            "train_data_paths": ["a", "b"],
            "betas": (0.8, 0.9),
        }
    )
    assert cfg.model.max_position_embeddings == 64
    assert cfg.model.num_kv_heads == 3
    assert cfg.model.intermediate_size == 4 * 96
    d = to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # plain YAML types only
    assert from_dict(d) == cfg
    assert from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert isinstance(from_dict({}), Config)


def test_flat_hyphen_and_nested_forms_agree():
    a = from_dict({"num-layers": 3, "hidden-size": 128, "pos-emb": "learned", "lr": 1e-3})
    b = from_dict({"model": {"num_layers": 3, "hidden_size": 128, "pos_emb": "learned"}, "optimizer": {"lr": 1e-3}})
    assert a == b and a.model.num_layers == 3 and a.model.pos_emb == "learned"


def test_wrong_type_names_file_and_key(tmp_path):
    p = write(tmp_path, "x.yml", "num-layers: abc\n")
    with pytest.raises(ConfigError, match=r"x\.yml: key 'num-layers': expected an integer, got 'abc'$"):
        load([p])
    with pytest.raises(ConfigError, match=r"key 'model.gpt_j_residual': expected true or false, got 'yes please'"):
        from_dict({"model": {"gpt_j_residual": "yes please"}})
    with pytest.raises(ConfigError, match=r"key 'lr': expected a number, got 'fast'"):
        from_dict({"lr": "fast"})
    # YAML 1.1 reads 1e-4 (no dot) as a string; float fields accept it
    assert load([write(tmp_path, "y.yml", "lr: 1e-4\n")]).optimizer.lr == 1e-4


def test_unknown_key_suggests(tmp_path):
    p = write(tmp_path, "x.yml", "hidden_sise: 12\n")
    with pytest.raises(ConfigError, match=r"x\.yml: key 'hidden_sise': unknown key; did you mean 'hidden_size'"):
        load([p])
    with pytest.raises(ConfigError, match=r"key 'model.hiden_size': unknown model setting; did you mean 'hidden_size'"):
        from_dict({"model": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match=r"key 'zero_optimization.stag': .*did you mean 'stage'"):
        from_dict({"zero_optimization": {"stag": 1}})


def test_choices_violated():
    with pytest.raises(ConfigError, match=r"key 'pos-emb': 'rope' is not one of 'learned', .*'rotary'"):
        from_dict({"pos-emb": "rope"}, "c.yml")
    assert from_dict({"norm": "RMSNorm"}).model.norm == "rmsnorm"  # case-insensitive match


@pytest.mark.parametrize(
    "text, line",
    [
        ("num_layers: 2\nhidden_size: 64\nnum_layers: 3\n", 3),
        ("num-layers: 2\nnum_layers: 3\n", 2),
        ("model:\n  hidden-size: 8\n  hidden_size: 16\n", 3),
        ('{\n  "num-layers": 2,\n  "seq-length": 8,\n  "num_layers": 2,\n}\n', 4),
    ],
)
def test_duplicate_key_in_one_file(tmp_path, text, line):
    p = write(tmp_path, "dup.yml", text)
    with pytest.raises(ConfigError, match=rf"dup\.yml: line {line}: key '.*' appears twice in one mapping"):
        load([p])


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    p = write(tmp_path, "m.yml", "model:\n  <<: {num_layers: 2, hidden_size: 64}\n  num_layers: 3\n")
    cfg = load([p])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (3, 64)


def test_duplicate_flat_and_nested_in_one_file(tmp_path):
    p = write(tmp_path, "dup.yml", "hidden_size: 64\nmodel:\n  hidden_size: 128\n")
    with pytest.raises(ConfigError, match=r"key 'model.hidden_size': set twice in one file \(also as 'hidden_size'\)"):
        load([p])


def test_duplicate_key_in_json(tmp_path):
    p = write(tmp_path, "dup.json", '{"num-layers": 2, "num_layers": 3}')
    with pytest.raises(ConfigError, match=r"dup\.json: key 'num_layers' appears twice"):
        load([p])
    ok = write(tmp_path, "ok.json", '{"num-layers": 5, "optimizer": {"type": "Adam", "params": {"lr": 0.01}}}')
    cfg = load([ok])
    assert cfg.model.num_layers == 5 and cfg.optimizer.lr == 0.01


def test_gpt_neox_flow_mapping_with_comments(tmp_path):
    text = """# a GPT-NeoX style file
{
  # model
  "num-layers": 6,
  "hidden-size": 512,   # width
  "num-attention-heads": 8,
  "attention-config": [[["global"], 6]],
  "optimizer": {
    "type": "Adam",
    "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1.0e-8,},
  },
  "zero_optimization": {"stage": 1, "overlap_comm": True, "cpu_offload": False},
  "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 12},
}
"""
    r = resolve([write(tmp_path, "neox.yml", text)])
    c = r.config
    assert (c.model.num_layers, c.model.hidden_size, c.model.num_attention_heads) == (6, 512, 8)
    assert c.optimizer.type == "adamw" and c.optimizer.lr == 0.001 and c.optimizer.betas == [0.9, 0.95]
    assert c.parallel.zero_stage == 1 and c.parallel.cpu_offload is False
    assert c.precision.precision == "fp16" and c.precision.loss_scale is None and c.precision.initial_scale_power == 12
    assert any("overlap_comm" in n for n in r.notes) and c.model.attention_types == ["global"] * 6


def test_invalid_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "bad.yml", "num_layers: 2\nhidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: line \d+: invalid YAML"):
        load([p])
    with pytest.raises(ConfigError, match=r"nope\.yml: no such config file"):
        load([str(tmp_path / "nope.yml")])
    with pytest.raises(ConfigError, match=r"list\.yml: expected a mapping"):
        load([write(tmp_path, "list.yml", "- 1\n- 2\n")])


def test_merge_order_later_file_wins(tmp_path):
    a = write(tmp_path, "a.yml", "num_layers: 2\nhidden_size: 64\nseq_length: 32\n")
    b = write(tmp_path, "b.yml", "model: {num_layers: 4}\nseq-length: 64\n")
    c = write(tmp_path, "c.yml", "num-layers: 6\n")
    cfg = load([a, b, c])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length) == (6, 64, 64)
    assert load([c, b, a]).model.num_layers == 2
    # different files may set the same key in different spellings: no duplicate error across files
    assert load([a, b]).model.num_layers == 4


def test_config_dir_prefix(tmp_path):
    d = tmp_path / "configs"
    d.mkdir()
    write(d, "base.yml", "num_layers: 3\n")
    write(d, "more.yml", "hidden_size: 128\n")
    cfg = load(["base.yml", "more.yml"], config_dir=str(d))
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (3, 128)
    with pytest.raises(ConfigError, match=r"configs/missing\.yml: no such config file"):
        load(["missing.yml"], config_dir=str(d))


def test_set_overrides(tmp_path):
    p = write(tmp_path, "a.yml", "num_layers: 2\nhidden_size: 64\n")
    cfg = load(
        [p],
        [
            "model.hidden_size=128",
            "num-layers=5",
            "optimizer.betas=[0.8, 0.9]",
            "optimizer.params.lr=3e-4",
            "data_path=data/x_text_document",
            "fp16.enabled=true",
        ],
    )
    assert cfg.model.hidden_size == 128 and cfg.model.num_layers == 5
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.optimizer.lr == 3e-4
    assert cfg.data.data_path == "data/x_text_document" and cfg.precision.precision == "fp16"
    assert load([p], ["hidden-size=96", "hidden_size=256"]).model.hidden_size == 256  # later --set wins
    with pytest.raises(ConfigError, match=r"--set hidden_size=abc: key 'hidden_size': expected an integer"):
        load([p], ["hidden_size=abc"])
    with pytest.raises(ConfigError, match=r"--set hidden_size: expected KEY=VALUE"):
        load([p], ["hidden_size"])
    with pytest.raises(ConfigError, match=r"key 'pipe_parallel_size': expected an integer, got \[1\]"):
        load([p], ["pipe_parallel_size=[1]"])
    with pytest.raises(ConfigError, match=r"key 'model': expected a mapping of model settings, got 3"):
        load([p], ["model=3"])


def test_conflicting_keys_in_one_file():
    with pytest.raises(ConfigError, match=r"key 'fp16': 'fp16' conflicts with 'precision': 'bfloat16'"):
        from_dict({"precision": "bfloat16", "fp16": {"enabled": True}})
    # the same value by two keys is fine (GPT-NeoX bf16 configs carry both)
    assert from_dict({"precision": "bfloat16", "bf16": {"enabled": True}}).precision.precision == "bf16"


def test_missing_data_path_only_when_training(tmp_path):
    p = write(tmp_path, "x.yml", "num_layers: 2\n")
    assert load([p]).data.data_path is None
    with pytest.raises(ConfigError, match=r"key 'data.data_path': training needs data: set data_path"):
        load([p], training=True)
    cfg = load([p], ["data_path=d_text_document"], training=True)
    assert cfg.data.data_path == "d_text_document"
    with pytest.raises(ConfigError, match=r"tokenizer_type HFTokenizer needs vocab_file"):
        load([p], ["data_path=d", "tokenizer_type=HFTokenizer"], training=True)
    with pytest.raises(ConfigError, match=r"x\.yml: key 'train_data_paths': set either data_path"):
        from_dict({"data_path": "a", "train_data_paths": ["b"]}, str(tmp_path / "x.yml"), training=True)


def test_no_effect_keys_are_reported_once_per_file(tmp_path, caplog):
    p = write(tmp_path, "n.yml", "bias-gelu-fusion: true\nsteps_per_print: 10\nnum_layers: 2\n")
    with caplog.at_level("WARNING", logger="neox.config.loader"):
        load([p])
    assert [r.getMessage() for r in caplog.records] == [
        f"{p}: 2 key(s) have no effect in neox (`neox config show` lists them and why)"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="neox.config.loader"):
        r = resolve([p], announce=False)  # the caller reports them (config show lists each)
    assert caplog.records == [] and [n.split(": key ")[1].split(" has")[0] for n in r.notes] == [
        "'bias-gelu-fusion'",
        "'steps_per_print'",
    ]
