"""Every config in configs/ works with `neox info` and `neox config show` before any tokenizer file or dataset
is downloaded, and their GPT-NeoX no-effect keys are listed by `config show` only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from neox.cli import main
from neox.commands.info import KNOWN_VOCABS
from neox.config.loader import resolve
from neox.config.schema import TokenizerConfig
from neox.data.tokenizers import build_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(p.name for p in CONFIGS.glob("*.yml"))

# vocab_size in the config.json of the released models (EleutherAI/pythia-*, EleutherAI/gpt-neox-20b on the
# Hugging Face hub): the 20B tokenizer padded to 128 x the tensor-parallel size they were trained with
RELEASED_VOCAB = {"pythia-70m.yml": 50304, "pythia-6.9b.yml": 50432, "pythia-12b.yml": 50688, "neox-20b.yml": 50432}


@pytest.fixture
def fresh_checkout(tmp_path, monkeypatch):
    """A working directory without data/: the configs' relative tokenizer and data paths do not exist."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_users_command_pythia_info_with_nproc(fresh_checkout, capsys):
    assert main(["info", str(CONFIGS / "pythia-1.4b.yml"), "--nproc", "8"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no line of no-effect keys, no tokenizer error
    assert out.splitlines()[1] == (
        "vocabulary: 50304 (50277 tokens padded to a multiple of 128; the known size of 20B_tokenizer.json: "
        "data/tokenizers/20B_tokenizer.json is not here)"
    )
    assert "parameters: 1,414,647,808" in out and "dp 8, tp 1, pp 1" in out


@pytest.mark.parametrize("name", ALL)
def test_info_answers_for_every_bundled_config_without_files(name, fresh_checkout, capsys):
    assert main(["info", str(CONFIGS / name), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    report = json.loads(out)
    if name in RELEASED_VOCAB:
        assert report["vocab_size"] == RELEASED_VOCAB[name]
    assert report["params"] > 0 and report["memory"]["total"] > 0


@pytest.mark.parametrize("name", ALL)
def test_config_show_lists_each_no_effect_key_once(name, fresh_checkout, capsys):
    path = str(CONFIGS / name)
    assert main(["config", "show", path]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["model"]["num_layers"] > 0
    notes = resolve([path], announce=False).notes
    # the notes with their reasons, and nothing else: no summary line repeating them
    assert err.splitlines() == [f"note: {n}" for n in notes]
    if name.startswith("pythia"):
        assert len(notes) == 13 and "key 'bias-gelu-fusion' has no effect here" in err


def test_loading_for_training_says_it_in_one_short_line(caplog):
    path = str(CONFIGS / "pythia-1.4b.yml")
    with caplog.at_level("WARNING", logger="neox.config.loader"):
        resolve([path], training=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 13 key(s) have no effect in neox (`neox config show` lists them and why)"
    ]


@pytest.mark.parametrize("kind, name", sorted(KNOWN_VOCABS))
def test_known_vocab_sizes_are_the_real_files(kind, name, shared_data):
    tdir = shared_data / "tokenizers"
    merges = str(tdir / "gpt2-merges.txt") if kind == "GPT2BPETokenizer" else None
    tok = build_tokenizer(TokenizerConfig(tokenizer_type=kind, vocab_file=str(tdir / name), merge_file=merges))
    assert tok.vocab_size == KNOWN_VOCABS[(kind, name)]


def test_a_present_tokenizer_file_is_read_not_looked_up(fresh_checkout, shared_data, capsys):
    # the file's own size wins over the table: here a GPT-2 file under the 20B tokenizer's name
    (fresh_checkout / "data/tokenizers").mkdir(parents=True)
    shutil.copy(shared_data / "tokenizers/gpt2.json", fresh_checkout / "data/tokenizers/20B_tokenizer.json")
    assert main(["info", str(CONFIGS / "pythia-70m.yml")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "vocabulary: 50304 (50257 tokens padded to a multiple of 128; read from data/tokenizers/20B_tokenizer.json)"
    )


def test_an_unknown_missing_tokenizer_is_one_line_exit_2(fresh_checkout, capsys):
    assert main(["info", str(CONFIGS / "pythia-70m.yml"), "--set", "vocab_file=data/mine.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox info: error: model.vocab_size is unset") and err.count("\n") == 1
    assert "data/mine.json: no such file" in err and "--vocab-size" in err
