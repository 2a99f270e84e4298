"""The generation cases of neox bench: eager and compiled neox beside transformers, each compared with it, and
neox's rows alone (said once) when transformers is missing. Records made up here; no child process."""

from __future__ import annotations

from neox.bench import run
from neox.bench.run import Bench, Plan
from tests.bench.test_run import _rec


def _engines(bench: Bench) -> list[str]:
    (_, _, engines), *_ = [c for c in bench.cases("bf16", None) if c[0] == "generate"]
    return [e for e, *_ in engines]


def test_eager_and_compiled_beside_transformers(monkeypatch):
    monkeypatch.setattr(run, "has_transformers", lambda: True)
    assert _engines(Bench(Plan(only=("generate",)))) == ["neox", "neox-compiled", "hf"]
    assert _engines(Bench(run.quick_plan(only=("generate",)))) == ["neox", "hf"]  # no compile in a smoke run


def test_without_transformers_only_neox_runs_and_says_why(monkeypatch):
    monkeypatch.setattr(run, "has_transformers", lambda: False)
    lines: list[str] = []
    bench = Bench(Plan(only=("generate",)), echo=lines.append)
    assert _engines(bench) == ["neox", "neox-compiled"]
    monkeypatch.setattr(bench, "child", lambda kind, args, **extra: {"result": {"gpus": [], "device": "cpu"}})
    monkeypatch.setattr(run, "cpu_info", lambda: {"model": "Test CPU", "cpu_count": 2, "relevant_flags": []})
    bench.plan.rounds = 1
    bench.run()
    assert sum("transformers is not installed" in x for x in lines) == 1


def test_both_neox_rows_are_compared_with_transformers():
    b = Bench(Plan(rounds=1, only=("generate",)))
    b.plan.resolved = {"precision": "bf16"}
    for engine, tps in (("neox", 200.0), ("neox-compiled", 300.0), ("hf", 100.0)):
        b.records.append(_rec("generate", "pythia-70m", engine, 0, {"1": {"tokens_per_s": tps}}))
    rows = {r["engine"]: r for r in b.rows("generate")}
    assert rows["neox"]["ratio"] == 2.0 and rows["neox-compiled"]["ratio"] == 3.0
    assert "ratio" not in rows["hf"]
