"""`neox generate HF_MODEL_DIR`: a local transformers GPTNeoX / Llama directory is converted in memory (nothing
written) and samples as transformers' own model does; a broken directory is one line with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from neox.cli import main
from neox.data.tokenizers import build_tokenizer
from neox.interop.hf import is_hf_model_dir
from neox.interop.hf_tokenizer import export_tokenizer
from tests.infer.tiny import make_run, tiny_config

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def _hf_model(kind: str):
    """A small random GPTNeoXForCausalLM (Pythia layout) or LlamaForCausalLM, every weight perturbed."""
    torch.manual_seed(0)
    if kind == "pythia":
        conf = transformers.GPTNeoXConfig(
            **SHAPE, intermediate_size=256, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False
        )
        model = transformers.GPTNeoXForCausalLM(conf)
    else:
        conf = transformers.LlamaConfig(
            **SHAPE, num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=True, rms_norm_eps=1e-6
        )
        model = transformers.LlamaForCausalLM(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _hf_dir(path, kind: str):
    """HF model directory with a byte-level tokenizer.json; returns (transformers model, neox tokenizer)."""
    tok = build_tokenizer(tiny_config().tokenizer)
    hf = _hf_model(kind)
    hf.config.eos_token_id = hf.generation_config.eos_token_id = tok.eod_id
    hf.save_pretrained(path)
    export_tokenizer(tok, path)
    return hf, tok


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("kind", ["pythia", "llama"])
def test_generate_from_hf_directory_matches_transformers(kind, tmp_path, monkeypatch, capsys):
    hf, tok = _hf_dir(tmp_path / "hf", kind)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    out = tmp_path / "out.jsonl"
    args = ["generate", str(tmp_path / "hf"), "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0"]
    assert main([*args, "--output-file", str(out)]) == 0
    assert _listing(tmp_path) == sorted([*before, "out.jsonl"])  # converted in memory: no run directory
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]

    prompt = tok.encode("Hello")
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    theirs = theirs[: theirs.index(tok.eod_id)] if tok.eod_id in theirs else theirs
    assert record["prompt"] == "Hello" and record["completion"] == tok.decode(theirs)
    assert record["tokens"] == len(theirs) > 0
    assert capsys.readouterr().err == f"wrote 1 completions to {out}\n"


def test_generate_from_hf_directory_prints_samples_and_takes_set(tmp_path, capsys):
    _hf_dir(tmp_path / "hf", "pythia")
    argv = [
        "generate",
        str(tmp_path / "hf"),
        "--num-samples",
        "2",
        "--seed",
        "1",
        "--set",
        "generation.maximum_tokens=3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample ") == 2 and "tokens" in out


def test_a_neox_directory_is_never_taken_for_hf(tmp_path):
    make_run(tmp_path / "run", tiny_config())
    (tmp_path / "run/config.json").write_text("{}")  # e.g. an export written into the run directory
    assert not is_hf_model_dir(tmp_path / "run")
    assert not is_hf_model_dir(tmp_path / "nothing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text("{}")
    assert is_hf_model_dir(tmp_path / "hf")


def _broken_dirs(root):
    hf, _ = _hf_dir(root / "good", "pythia")
    (root / "gpt2").mkdir()
    (root / "gpt2/config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (root / "notjson").mkdir()
    (root / "notjson/config.json").write_text("{oops")
    hf.save_pretrained(root / "notok")  # weights but no tokenizer files
    hf.config.save_pretrained(root / "noweights")
    export_tokenizer(build_tokenizer(tiny_config().tokenizer), root / "noweights")


@pytest.mark.parametrize(
    "name, extra, expected",
    [
        ("gpt2", [], "model_type='gpt2' / architectures='GPT2LMHeadModel' is not supported"),
        ("notjson", [], "notjson/config.json: not a transformers model config"),
        ("notok", [], "notok: no tokenizer.json, vocab.json+merges.txt or tokenizer.model"),
        ("noweights", [], "noweights: no *.safetensors or pytorch_model*.bin weights found"),
        ("good", ["--set", "tokenizer.eod_token=<nope>"], "tokenizer.eod_token: '<nope>' is not a token of"),
        ("good", ["--set", "model.num_layers=3"], "weights do not match its config.json"),
    ],
)
def test_broken_hf_directories_are_one_line_exit_2(name, extra, expected, tmp_path_factory, capsys):
    root = tmp_path_factory.getbasetemp() / "broken_hf"
    if not root.exists():
        _broken_dirs(root)
        capsys.readouterr()  # transformers' save progress bars
    assert main(["generate", str(root / name), "--prompt", "hi", "--max-new-tokens", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox generate: error: ") and err.count("\n") == 1, err
    assert expected in err
