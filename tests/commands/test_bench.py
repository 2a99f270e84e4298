"""`neox bench`: the --quick run's table and JSON report, and the start-up check that light commands stay
free of torch (structural facts; no timing is asserted anywhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from neox.bench.startup import light_command
from neox.cli import main


def test_help_and_config_show_import_no_torch(tmp_path):
    cfg = tmp_path / "m.yml"
    cfg.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nvocab_size: 256\n")
    for argv in (["--help"], ["config", "show", str(cfg)]):
        r = light_command(argv)
        assert r["rc"] == 0, argv
        assert r["imports_torch"] is False, f"neox {' '.join(argv)} imported torch"


def test_the_torch_check_sees_an_import():
    """The check is not vacuous: `neox train` (its module imports the trainer) is reported as importing torch,
    and `neox bench` refuses bad input before anything heavy."""
    assert light_command(["train", "--help"]) == {"seconds": pytest.approx(0, abs=1e9), "rc": 0, "imports_torch": True}
    r = light_command(["bench", "--only", "nothing"])
    assert r["rc"] == 2 and r["imports_torch"] is False


def test_unknown_section_is_a_one_line_error(capsys):
    assert main(["bench", "--only", "train,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only" in err[0] and "nope" in err[0]


@pytest.mark.slow
def test_quick_bench_prints_the_table_and_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "neox.cli", "bench", "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| section | case | point | engine | tokens/s best |" in res.stdout
    assert "| neox config show |" in res.stdout
    report = json.loads(out.read_text())
    cpu = report["machine"]["cpu"]
    assert cpu["model"] and isinstance(cpu["flags"], list) and cpu["cpu_count"] >= 1
    assert {"torch", "transformers", "neox"} <= set(report["machine"]["versions"])
    assert report["errors"] == [] and report["complete"] is True
    prec = report["plan"]["resolved"]["precision"]
    assert report["peak_flops"][prec] > 0
    s = report["summary"]
    assert [(r["engine"], r["case"]) for r in s["train"]] == [("neox", "pythia-14m"), ("hf", "pythia-14m")]
    assert [(r["point"], r["engine"]) for r in s["generate"]] == [
        ("1", "neox"),
        ("1", "hf"),
        ("8", "neox"),
        ("8", "hf"),
    ]
    assert [r["engine"] for r in s["preprocess"]] == ["neox", "raw"]
    for section in ("train", "generate", "preprocess"):
        for r in s[section]:
            assert r["tokens_per_s_best"] > 0 and len(r["load"]) == 1 and len(r["load"][0]) == 2
            assert (r.get("ratio") is not None) == (r["engine"] == "neox")
    for r in s["train"]:
        assert r["mfu"] > 0 and r["first_step_s"] > 0 and r["peak_mem_bytes"] > 0
    assert s["startup"]["help"]["imports_torch"] is False
    assert s["startup"]["config_show"]["imports_torch"] is False
    assert s["startup"]["train_first_step"]["seconds_best"] > 0
    every = report["measurements"]
    assert all("load_before" in m and "load_after" in m for m in every)
    # engines alternate within the round: neox right before its reference, case by case
    engines = [m["engine"] for m in every if m.get("section") in ("train", "generate", "preprocess")]
    assert engines == ["neox", "hf", "neox", "hf", "neox", "raw"]
    assert list(scratch.glob("neox-bench-*")) == []  # the synthetic corpora and start-up runs are removed
