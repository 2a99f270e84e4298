"""bench/gpu_check.py's plumbing, in its --cpu smoke mode: rows, JSON report, skips and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402  (bench/ is not a package)


def run(*flags, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_without_cuda_and_without_cpu_flag_says_so_and_exits_2():
    out = run()
    assert out.returncode == 2
    assert out.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False); --cpu runs the smoke mode"
    ]


@pytest.mark.slow
def test_cpu_smoke_mode_runs_checks_skips_cuda_only_ones_and_writes_the_report(tmp_path):
    only = "env,pytest-cuda,train-fp32,host-syncs,attention,throughput,generation,ddp"
    out = run("--cpu", "--only", only, "--out", str(tmp_path / "report.json"), "--workdir", str(tmp_path / "w"))
    assert out.returncode == 0, out.stdout + out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table] == only.split(",")
    assert all(len(line.split(" | ")) == 4 for line in table)  # no stray "|" inside a figure
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["check"]: r for r in report["rows"]}
    assert report["mode"] == "cpu"
    assert rows["pytest-cuda"]["result"] == rows["host-syncs"]["result"] == "skipped: no CUDA"
    for name in ("env", "train-fp32", "attention", "throughput", "generation", "ddp"):
        assert rows[name]["result"] == "pass", rows[name]
    train = rows["train-fp32"]["details"]
    assert len(train["losses"]) == 20 and train["resumed_losses"] == train["losses"][10:]  # CPU: bitwise
    kinds = rows["attention"]["details"]
    assert set(kinds) == {"causal", "document", "alibi", "t5-bias", "gqa-causal"}
    assert all("math" in k["accepted"] for k in kinds.values())  # math takes every mask
    assert rows["ddp"]["figure"].startswith("backend gloo, iteration 4")


def test_a_failing_check_is_a_row_and_the_exit_status_is_1(tmp_path, monkeypatch, capsys):
    def broken(budget):
        raise AssertionError("must not run: --only leaves it out")

    monkeypatch.setattr(gpu_check.Runner, "pytest_cuda", lambda self, budget: gpu_check.Row("x", "fail", "a | b"))
    monkeypatch.setattr(gpu_check.Runner, "throughput", broken)
    monkeypatch.setattr(
        sys, "argv", ["gpu_check.py", "--cpu", "--only", "pytest-cuda", "--out", str(tmp_path / "r.json")]
    )
    assert gpu_check.main() == 1
    printed = capsys.readouterr().out
    assert "| pytest-cuda | fail | a / b | 0 |" in printed and "failed: pytest-cuda" in printed
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["result"] == "fail"


def test_a_run_error_line_is_the_ranks_exception_not_the_launchers():
    log = (
        "[rank0]:   File 'compose.py', line 86, in parallelize\n"
        "[rank0]: AttributeError: 'PrecisionConfig' object has no attribute 'x'\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    )
    assert gpu_check.error_line(log) == "[rank0]: AttributeError: 'PrecisionConfig' object has no attribute 'x'"
    assert gpu_check.error_line("ok\nneox train: error: bad key\n") == "neox train: error: bad key"
