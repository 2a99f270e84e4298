"""`neox info`: reads GPT-NeoX configs, reports counts and estimates, fails with one-line errors."""

import json
from pathlib import Path

from neox.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_info_json_for_pythia_config(capsys):
    assert main(["info", str(CONFIGS / "pythia-160m.yml"), "--vocab-size", "50277", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocab_size"] == 50304  # padded to a multiple of 128
    assert report["params"] == 162_322_944
    assert report["memory"]["total"] == sum(v for k, v in report["memory"].items() if k != "total")


def test_info_table_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "m.yml"
    cfg.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nvocab_size: 256\n")
    assert main(["info", str(cfg), "--set", "model.num_layers=3", "--dp", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: 3 layers, hidden 64")
    assert "parameters:" in out and "FLOPs per token" in out and "dp 2" in out


def test_info_without_vocab_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "m.yml"
    cfg.write_text("tokenizer_type: HFTokenizer\nvocab_file: missing.json\n")
    assert main(["info", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neox info: error:") and "--vocab-size" in err and "\n" not in err
