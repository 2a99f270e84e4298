"""`neox train`: a YAML config plus --set overrides trains and saves; bad input is a one-line error."""

import pytest
import torch
import yaml

from neox.cli import main

from .tiny_run import make_corpus


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_train_command_runs_a_config_with_overrides(tmp_path, capsys):
    prefix = make_corpus(tmp_path / "data", docs=100)
    cfg = {
        "num_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "seq_length": 16,
        "tokenizer_type": "ByteLevelTokenizer",
        "data_path": prefix,
        "split": "90,5,5",
        "train_micro_batch_size_per_gpu": 2,
        "train_iters": 50,
        "eval_interval": 2,
        "eval_iters": 1,
        "log_interval": 1,
        "save": str(tmp_path / "run"),
        "progress_bar": False,
    }
    (tmp_path / "tiny.yml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "tiny.yml", "-d", str(tmp_path), "--set", "train_iters=3", "--set", "optimizer.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "iter      3/3 | loss" in out and "val loss" in out and "done: iteration 3" in out
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_0000003"
    saved = yaml.safe_load((tmp_path / "run" / "iter_0000003" / "config.yml").read_text())
    assert saved["optimizer"]["lr"] == 1e-3 and saved["model"]["vocab_size"] == 384


def test_train_command_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.yml").write_text("num_layers: 2\ndata_path: nowhere/x_text_document\n")
    assert main(["train", str(tmp_path / "bad.yml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neox train: error:") and "\n" not in err
