"""An exported directory loads in transformers 4.x as well as the pinned 5.x: tokenizer class and inputs,
left padding, model_max_length, generation_config.json, the 4.x rotary keys, and one file mode for all files.

The 4.x check runs in a throw-away virtual environment (transformers<5 with this torch), built once under
$NEOX_TF4_VENV (default: a folder in the temp dir) and reused while it exists."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from neox.data.tokenizers import build_tokenizer
from neox.infer.generate import generate
from neox.interop.hf import export_model
from tests.infer.tiny import random_model, tiny_config

transformers = pytest.importorskip("transformers")

PROMPTS = ["def f(x):\n    return", "héllo <|endoftext|> wörld, a longer prompt than the first"]
NEW_TOKENS = 6


def _export(out: Path, **model):
    cfg = tiny_config(rotary_pct=0.5, **model)  # 4.x reads rotary_pct (default 0.25), 5.x rope_parameters
    model = random_model(cfg, scale=0.5)
    tok = build_tokenizer(cfg.tokenizer)
    export_model(cfg, model.state_dict(), tok, out)
    return model, tok


def _neox_expected(model, tok) -> dict:
    ids = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        logits = model(torch.tensor([ids[0]]))[0].tolist()
    return {"ids": ids, "logits": logits, "greedy": generate(model, ids, NEW_TOKENS, eod_id=tok.eod_id).tokens}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_export_writes_portable_tokenizer_and_generation_files(tmp_path):
    out = tmp_path / "hf"
    model, tok = _export(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert tok_cfg["padding_side"] == "left" and tok_cfg["model_max_length"] == 128
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["max_length"]) == (tok.eod_id, tok.pad_id, 128)
    config = json.loads((out / "config.json").read_text())
    assert config["rotary_pct"] == config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert config["torch_dtype"] == config["dtype"] == "float32"
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~_umask()}, modes  # safetensors alone used to be 0600

    # the user's lines: tokenizer(prompts) straight into generate(), a left-padded batch
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    enc = hf_tok(PROMPTS, return_tensors="pt", padding=True)
    assert sorted(enc) == ["attention_mask", "input_ids"]
    expected = _neox_expected(model, tok)
    width = enc["input_ids"].shape[1]
    assert enc["input_ids"].tolist() == [[tok.pad_id] * (width - len(i)) + i for i in expected["ids"]]
    got = hf.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)[:, width:].tolist()
    for ours, theirs in zip(expected["greedy"], got):
        assert ours == (theirs[: theirs.index(tok.eod_id)] if tok.eod_id in theirs else theirs)


# ---- transformers 4.x ---------------------------------------------------------------------------------------

TF4_SCRIPT = r"""
import json, sys
import torch, transformers
out, new_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
tok = transformers.AutoTokenizer.from_pretrained(out)
model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
enc = tok(prompts, return_tensors="pt", padding=True)
width = enc["input_ids"].shape[1]
with torch.no_grad():
    logits = model(torch.tensor([tok(prompts[0])["input_ids"]])).logits[0].tolist()
gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)[:, width:].tolist()
print(json.dumps({
    "version": transformers.__version__, "class": type(tok).__name__, "keys": sorted(enc),
    "ids": [tok(p)["input_ids"] for p in prompts], "padded": enc["input_ids"].tolist(), "logits": logits,
    "greedy": gen, "padding_side": tok.padding_side, "model_max_length": tok.model_max_length,
    "eos": tok.eos_token_id, "pad": tok.pad_token_id, "gen_max_length": model.generation_config.max_length,
}))
"""

OFFLINE_MARKERS = (
    "No matching distribution",
    "Could not find a version",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
)


def _tf4_python() -> Path:
    """The 4.x environment's python: built once (python -m venv + pip install), reused while it exists."""
    venv = Path(os.environ.get("NEOX_TF4_VENV") or Path(tempfile.gettempdir()) / "neox-tf4-venv")
    python, ready = venv / "bin" / "python", venv / ".neox-ready"
    torch_version = torch.__version__.split("+")[0]
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test processes build it once
        if ready.is_file() and ready.read_text() == torch_version and python.exists():
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        # this torch's version, so pip takes the same build (a local wheel where there is one), never another
        pins = [f"torch=={torch_version}", "transformers>=4.45,<5", "safetensors"]
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *pins], capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            log = proc.stdout + proc.stderr
            if any(m in log for m in OFFLINE_MARKERS):
                pytest.skip(f"cannot install {' '.join(pins)} into {venv}: package index unreachable")
            pytest.fail(f"pip install {' '.join(pins)} failed:\n{log[-3000:]}")
        ready.write_text(torch_version)
    return python


@pytest.mark.slow
def test_export_loads_and_generates_in_transformers_4(tmp_path):
    python = _tf4_python()
    out = tmp_path / "hf"
    model, tok = _export(out)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(python), "-c", TF4_SCRIPT, str(out), str(NEW_TOKENS), json.dumps(PROMPTS)],
        cwd=tmp_path,  # nothing of this checkout on the 4.x side's import path
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.") and got["class"] == "PreTrainedTokenizerFast"
    assert got["keys"] == ["attention_mask", "input_ids"]  # no token_type_ids for generate() to refuse
    assert (got["padding_side"], got["model_max_length"], got["gen_max_length"]) == ("left", 128, 128)
    assert (got["eos"], got["pad"]) == (tok.eod_id, tok.pad_id)
    expected = _neox_expected(model, tok)
    assert got["ids"] == expected["ids"]  # <|endoftext|> in text stays bytes, as neox's byte-level reads it
    # same logits: 4.x built the same rotary embedding (rotary_pct 0.5, not its default 0.25)
    assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(expected["logits"]), atol=1e-4)
    width = len(got["padded"][0])
    assert got["padded"][0] == [tok.pad_id] * (width - len(expected["ids"][0])) + expected["ids"][0]
    for ours, theirs in zip(expected["greedy"], got["greedy"]):
        assert ours == (theirs[: theirs.index(tok.eod_id)] if tok.eod_id in theirs else theirs)
