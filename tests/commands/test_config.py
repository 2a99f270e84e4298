"""`neox config show` / `neox config docs`, and docs/config.md being up to date with the schema."""

from __future__ import annotations

import yaml

from neox.cli import main
from neox.config import docs, from_dict


def test_docs_config_md_is_up_to_date():
    assert docs.DOC_PATH.read_text(encoding="utf-8") == docs.render(), (
        "docs/config.md is out of date: run `neox config docs`"
    )


def test_docs_cover_every_field_and_table():
    text = docs.render()
    for group, cls in docs.GROUPS.items():
        for name in cls.__dataclass_fields__:
            assert f"`{group}.{name}`" in text
    assert "`checkpoint_factor`" in text and "`scaled_upper_triang_masked_softmax_fusion`" in text
    assert "| `s3_path` |" in text and "| `moe_type` |" in text


def test_config_docs_check_and_write(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert main(["config", "docs", "--check", "--out", str(out)]) == 1
    assert main(["config", "docs", "--out", str(out)]) == 0
    assert main(["config", "docs", "--check", "--out", str(out)]) == 0
    assert out.read_text() == docs.render()


def test_config_show_merges_and_overrides(tmp_path, capsys):
    a = tmp_path / "a.yml"
    a.write_text("num_layers: 2\nbias-gelu-fusion: true\n")
    assert main(["config", "show", "a.yml", "-d", str(tmp_path), "--set", "model.hidden_size=128"]) == 0
    captured = capsys.readouterr()
    shown = yaml.safe_load(captured.out)
    assert shown["model"]["num_layers"] == 2 and shown["model"]["hidden_size"] == 128
    assert from_dict(shown).model.hidden_size == 128
    assert "key 'bias-gelu-fusion' has no effect here" in captured.err


def test_config_show_errors_are_one_line(tmp_path, capsys):
    a = tmp_path / "a.yml"
    a.write_text("num-layers: abc\n")
    assert main(["config", "show", str(a)]) == 2
    err = capsys.readouterr().err
    assert err == f"neox config: error: {a}: key 'num-layers': expected an integer, got 'abc'\n"
