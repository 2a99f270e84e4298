"""neox plot: metrics.jsonl parsing (resumed runs, cut-short lines), the axes, smoothing, and the PNG."""

from __future__ import annotations

import json

import pytest

from neox.cli import main
from neox.errors import NeoxError
from neox.train import plot

image = pytest.importorskip("matplotlib.image", reason="neox plot needs the plot extra (matplotlib)")


def _write(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (path / "metrics.jsonl").write_text(text)
    return path


def _train(step, loss, tokens_per_step=100):
    return {
        "iteration": step,
        "loss": loss,
        "lr": 1e-3 * step,
        "grad_norm": 2.0 / step,
        "tokens_per_s": 50.0 + step,
        "consumed_tokens": step * tokens_per_step,
    }


def test_resumed_run_keeps_the_later_value_of_a_repeated_step(tmp_path):
    # logged 1..3, killed, resumed from the step-2 checkpoint: steps 3 and 4 are logged again / anew
    records = [_train(1, 5.0), _train(2, 4.0), _train(3, 9.9), _train(3, 3.0), _train(4, 2.5)]
    run, warnings = plot.read_run(_write(tmp_path / "a", records))
    assert warnings == []
    assert plot.points(run, "loss", "step") == ([1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 3.0, 2.5])
    assert run.label == "a"


def test_tokens_axis_and_validation_records(tmp_path):
    records = [_train(2, 4.0), {"iteration": 2, "val_loss": 4.5, "val_ppl": 90.0}, _train(4, 3.0)]
    records.append({"iteration": 5, "val_loss": 3.5})  # after the last training line: nearest earlier tokens
    run, _ = plot.read_run(_write(tmp_path / "r", records))
    assert plot.points(run, "loss", "tokens") == ([200.0, 400.0], [4.0, 3.0])
    assert plot.points(run, "val_loss", "tokens") == ([200.0, 400.0], [4.5, 3.5])


def test_non_finite_values_are_left_out(tmp_path):
    records = [_train(1, 5.0), {**_train(2, 1.0), "loss": None}, {**_train(3, 1.0), "grad_norm": "nan"}]
    run, _ = plot.read_run(_write(tmp_path / "r", records))
    assert plot.points(run, "loss", "step")[0] == [1.0, 3.0]
    assert plot.points(run, "grad_norm", "step")[0] == [1.0, 2.0]


def test_smoothing_is_a_trailing_mean():
    assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot.smooth([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]


def test_cut_short_last_line_is_a_warning_and_a_damaged_middle_line_an_error(tmp_path):
    run, warnings = plot.read_run(_write(tmp_path / "a", [_train(1, 5.0)], tail='{"iteration": 2, "lo'))
    assert len(warnings) == 1 and "metrics.jsonl:2" in warnings[0]
    assert plot.points(run, "loss", "step")[0] == [1.0]
    bad = _write(tmp_path / "b", [_train(1, 5.0)], tail="garbage\n" + json.dumps(_train(2, 4.0)) + "\n")
    with pytest.raises(NeoxError, match=r"metrics.jsonl:2: not a metrics record"):
        plot.read_run(bad)


def test_missing_or_empty_runs_are_one_line_errors(tmp_path):
    with pytest.raises(NeoxError, match="no metrics.jsonl there"):
        plot.read_run(tmp_path / "nothing")
    with pytest.raises(NeoxError, match="nothing to plot|no loss"):
        plot.read_run(_write(tmp_path / "e", [{"iteration": 0, "event": "start"}]))


def test_cli_writes_a_png_with_every_run(tmp_path, capsys):
    a = _write(tmp_path / "x" / "run", [_train(s, 6.0 - s) for s in range(1, 9)])
    b = _write(tmp_path / "y" / "run", [_train(s, 7.0 - s, 200) for s in range(1, 9)])
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--x", "tokens", "--smooth", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(out)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 1000  # a 2 x 3 grid of panels
    assert pixels.std() > 0.05  # lines were drawn, not a blank canvas


def test_cli_label_count_must_match(tmp_path, capsys):
    a = _write(tmp_path / "a", [_train(1, 5.0)])
    assert main(["plot", str(a), "--labels", "one,two", "--out", str(tmp_path / "p.png")]) == 2
    assert "--labels has 2 names for 1 runs" in capsys.readouterr().err
