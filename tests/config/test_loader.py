"""Loading, merging and overriding configs; GPT-NeoX key names; error messages that name file and key."""

from __future__ import annotations

import pytest
import yaml

from neox.config import from_dict, load, to_dict
from neox.config.schema import Config
from neox.errors import ConfigError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_derive_and_round_trip():
    cfg = from_dict({"hidden_size": 96, "num_attention_heads": 3, "seq_length": 64})
    assert cfg.model.max_position_embeddings == 64
    assert cfg.model.num_kv_heads == 3
    assert cfg.model.intermediate_size == 4 * 96
    d = to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert from_dict(d) == cfg
    assert isinstance(from_dict({}), Config)


def test_flat_hyphen_and_nested_forms_agree():
    a = from_dict({"num-layers": 3, "hidden-size": 128, "pos-emb": "learned"})
    b = from_dict({"model": {"num_layers": 3, "hidden_size": 128, "pos_emb": "learned"}})
    assert a == b and a.model.num_layers == 3 and a.model.pos_emb == "learned"


def test_wrong_type_names_file_and_key(tmp_path):
    p = write(tmp_path, "x.yml", "num-layers: abc\n")
    with pytest.raises(ConfigError, match=r"x\.yml: key 'num-layers': expected an integer, got 'abc'"):
        load([p])


def test_unknown_key_suggests(tmp_path):
    p = write(tmp_path, "x.yml", "hidden_sise: 12\n")
    with pytest.raises(ConfigError, match=r"x\.yml: key 'hidden_sise': unknown key; did you mean 'hidden_size'"):
        load([p])
    with pytest.raises(ConfigError, match=r"key 'model.hiden_size': unknown model setting; did you mean 'hidden_size'"):
        from_dict({"model": {"hiden_size": 3}})
