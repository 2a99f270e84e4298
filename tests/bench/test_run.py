"""neox.bench.run's summary: best and median over rounds, ratios at the same point and MFU, from records
made up here (the arithmetic checked against the formulas, no child process)."""

from __future__ import annotations

from neox.bench.run import Bench, Plan, table


def _rec(section, case, engine, rnd, result, load=(1.0, 2.0)):
    kind = section
    return {
        "kind": kind,
        "section": section,
        "case": case,
        "engine": engine,
        "round": rnd,
        "result": result,
        "load_before": [load[0], 0, 0],
        "load_after": [load[1], 0, 0],
    }


def test_rows_take_best_and_median_and_ratio_and_mfu():
    b = Bench(Plan(rounds=3, only=("train", "generate")))
    b.plan.resolved = {"precision": "fp32"}
    b.records = [
        {"kind": "machine", "result": {"matmul_flops": {"fp32": 1e9}}, "load_before": [0], "load_after": [0]},
        {"kind": "machine", "result": {"matmul_flops": {"fp32": 2e9}}, "load_before": [0], "load_after": [0]},
    ]
    train = {"neox": [100.0, 300.0, 200.0], "hf": [150.0, 50.0, 100.0]}
    for rnd in range(3):
        for engine in ("neox", "hf"):
            tps = train[engine][rnd]
            res = {"tokens_per_s": tps, "flops_per_token": 1e6, "peak_mem_bytes": 10 + rnd, "first_step_s": 5.0 - rnd}
            b.records.append(_rec("train", "pythia-14m", engine, rnd, res))
        b.records.append(
            _rec(
                "generate", "pythia-14m", "neox", rnd, {"1": {"tokens_per_s": 10.0 + rnd}, "8": {"tokens_per_s": 80.0}}
            )
        )
        b.records.append(
            _rec(
                "generate",
                "pythia-14m",
                "hf",
                rnd,
                {"1": {"tokens_per_s": 5.0}, "8": {"tokens_per_s": 20.0 * (rnd + 1)}},
            )
        )
    rows = b.rows("train")
    neox, hf = rows
    assert (neox["engine"], hf["engine"]) == ("neox", "hf")
    assert neox["tokens_per_s_best"] == 300.0 and neox["tokens_per_s_median"] == 200.0
    assert neox["ratio"] == 300.0 / 150.0 and "ratio" not in hf
    assert neox["mfu"] == 300.0 * 1e6 / 2e9  # against the best peak of the run
    assert neox["peak_mem_bytes"] == 12 and neox["first_step_s"] == 3.0
    assert neox["load"] == [[1.0, 2.0]] * 3
    gen = b.rows("generate")
    assert [(r["point"], r["engine"]) for r in gen] == [("1", "neox"), ("1", "hf"), ("8", "neox"), ("8", "hf")]
    assert gen[0]["ratio"] == 12.0 / 5.0 and gen[2]["ratio"] == 80.0 / 60.0
    report = b.report({"model": "Test CPU", "flags": []}, [], "fp32")
    text = table(report)
    assert "Test CPU" in text and "| train | pythia-14m | seq 512 x 4 | neox | 300 | 200 | 2.00x | 15.0% |" in text
