"""deepy.py: GPT-NeoX's `deepy.py train.py -d configs a.yml b.yml` becomes `neox train configs/a.yml configs/b.yml`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("deepy", ROOT / "deepy.py")
deepy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deepy)


def test_translate_configs_and_launcher_flags():
    assert deepy.translate(["train.py", "-d", "configs", "125M.yml", "local.yml", "--num_gpus", "4"]) == [
        "train",
        "configs/125M.yml",
        "configs/local.yml",
        "--nproc",
        "4",
    ]
    assert deepy.translate(["./generate.py", "/abs/a.yml", "--num_nodes=2", "--hostfile", "h"]) == [
        "generate",
        "/abs/a.yml",
        "--nnodes=2",
        "--hostfile",
        "h",
    ]
    assert deepy.translate(["eval.py", "a.yml"]) == ["eval", "a.yml"]


def test_unknown_script_is_a_usage_error():
    with pytest.raises(SystemExit, match="usage: deepy.py"):
        deepy.translate(["pretrain_gpt2.py", "a.yml"])


def test_runs_the_neox_command(tmp_path):
    import subprocess
    import sys

    # end to end through the neox CLI: a missing config is a one-line error from `neox train`, exit 2
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deepy.py"), "train.py", "-d", str(tmp_path), "nope.yml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "nope.yml" in proc.stderr and proc.stderr.startswith("neox train: error:")
