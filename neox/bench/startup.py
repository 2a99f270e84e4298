"""Start-up: how long `neox --help` and `neox config show` take and whether they import torch, and how long
`neox train` of a tiny model takes to finish its first step.

The light commands must stay free of torch (importing it alone takes seconds); each runs in a fresh
interpreter that reports, after the command, whether torch is in sys.modules: a structural fact a test can
assert, where a timing could not be. The train figure is wall time from starting `neox train` to the first
training record in its metrics.jsonl (written and flushed when step 1 ends): interpreter start, imports,
config, data, model build and one step of tiny-cpu.yml's model, fp32, no compilation (the config enables none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from neox.bench.train import synthetic_data

# configs/tiny-cpu.yml's model and batch (`make train`), on random tokens so that no corpus is needed
TINY = {
    "num_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "seq_length": 256,
    "pos_emb": "rotary",
    "rotary_pct": 1.0,
    "norm": "layernorm",
    "activation": "gelu",
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "tokenizer_type": "ByteLevelTokenizer",
    "vocab_size": 4096,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "train_iters": 2,
    "log_interval": 1,
    "split": "100,0,0",
    "eval_interval": 1000,
    "optimizer": {"type": "adamw", "lr": 2.0e-3, "betas": [0.9, 0.95]},
}

_WRAPPER = (
    "import json, sys\n"
    "from neox.cli import main\n"
    "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
    "sys.stderr.write('\\nNEOX_BENCH ' + json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}) + '\\n')\n"
)


def light_command(argv: list[str]) -> dict:
    """Wall seconds of `neox ARGV` in a fresh interpreter, its exit status and whether it imported torch."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    marks = [line for line in out.stderr.splitlines() if line.startswith("NEOX_BENCH ")]
    if not marks:
        raise RuntimeError(f"neox {' '.join(argv)} died: {out.stderr.strip()[-500:]}")
    report = json.loads(marks[-1].removeprefix("NEOX_BENCH "))
    return {"seconds": seconds, "rc": report["rc"], "imports_torch": report["torch"]}


def write_tiny_config(work: str) -> str:
    """tiny-cpu.yml's model on a random-token dataset in `work`, as a YAML file (JSON is YAML)."""
    data = synthetic_data(work, 256, 2048 * 16)  # byte-level ids
    cfg = {**TINY, "data_path": data, "log_dir": os.path.join(work, "run")}
    path = os.path.join(work, "tiny.yml")
    Path(path).write_text(json.dumps(cfg, indent=1))
    return path


def train_first_step(config: str, log_dir: str, timeout: float = 300.0) -> dict:
    """Seconds from starting `neox train CONFIG` to its first training record (step 1 done)."""
    metrics = Path(log_dir) / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neox.cli", "train", config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = None
    while first is None and time.perf_counter() - t0 < timeout:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                if "loss" in rec:
                    first = time.perf_counter() - t0
                    break
        if first is None and proc.poll() is not None:
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=timeout)
    if first is None:
        raise RuntimeError(f"neox train wrote no training record (exit {proc.returncode}): {err.strip()[-500:]}")
    return {"seconds": first, "rc": proc.returncode, "compile": False}


def startup_case(work: str) -> dict:
    config = write_tiny_config(work)
    return {
        "help": light_command(["--help"]),
        "config_show": light_command(["config", "show", config]),
        "train_first_step": train_first_step(config, os.path.join(work, "run")),
    }
