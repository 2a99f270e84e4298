"""metrics.jsonl writing, optional writers' errors, the cached matmul peak and console lines."""

import json
import sys
import time

import pytest
import torch

from neox.config.schema import LoggingConfig
from neox.errors import NeoxError
from neox.train import metrics


def test_jsonl_appends_and_keeps_nan_valid_json(tmp_path):
    m = metrics.Metrics(tmp_path, LoggingConfig())
    m.log({"iteration": 1, "loss": float("nan"), "lr": 0.1})
    m.close()
    m = metrics.Metrics(tmp_path, LoggingConfig())
    m.log({"iteration": 2, "val_loss": 1.5, "val_ppl": 4.48})
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"iteration": 1, "loss": "nan", "lr": 0.1}, {"iteration": 2, "val_loss": 1.5, "val_ppl": 4.48}]
    assert not metrics.Metrics(tmp_path / "other", LoggingConfig(), enabled=False).enabled
    assert not (tmp_path / "other").exists()  # a non-writing rank creates nothing


def test_tensorboard_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an absent package looks like
    with pytest.raises(NeoxError, match=r"neox\[tensorboard\]"):
        metrics.Metrics(tmp_path, LoggingConfig(tensorboard_dir=str(tmp_path / "tb")))


def test_wandb_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(NeoxError, match=r"neox\[wandb\]"):
        metrics.Metrics(tmp_path, LoggingConfig(use_wandb=True))


def test_tags_are_grouped_as_gpt_neox_groups_them():
    assert metrics.tag("loss") == "train/lm_loss"
    assert metrics.tag("lr") == "train/learning_rate"
    assert metrics.tag("val_loss") == "validation/lm_loss"
    assert metrics.tag("test_ppl") == "test/lm_loss_ppl"
    assert metrics.tag("tokens_per_s") == "runtime/tokens_per_sec"
    assert metrics.tag("step_time_s") == "runtime/iteration_time"
    assert metrics.tag("eval_tasks/lambada_openai/acc") == "eval_tasks/lambada_openai/acc"
    assert metrics.tag("curriculum_seqlen") == "train/curriculum_seqlen"


_RECORDS = [
    {"iteration": 10, "loss": 3.5, "lr": 1e-3, "tokens_per_s": 900.0, "step_time_s": 0.5},
    {"iteration": 20, "loss": 2.5, "lr": 2e-3, "tokens_per_s": 950.0, "step_time_s": 0.4},
    {"iteration": 20, "val_loss": 2.75, "val_ppl": 15.6},
]


def test_tensorboard_events_hold_the_grouped_tags(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    m = metrics.Metrics(tmp_path / "run", LoggingConfig(tensorboard_dir=str(tmp_path / "tb")))
    for r in _RECORDS:
        m.log(r)
    m.close()
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/lm_loss", "train/learning_rate", "runtime/tokens_per_sec", "runtime/iteration_time"} <= set(
        events.Tags()["scalars"]
    )
    assert [(e.step, e.value) for e in events.Scalars("train/lm_loss")] == [(10, 3.5), (20, 2.5)]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("validation/lm_loss")] == [(20, 2.75)]


def test_wandb_offline_run_holds_the_grouped_tags(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    m = metrics.Metrics(tmp_path / "run", LoggingConfig(use_wandb=True, wandb_mode="offline"), {"seed": 1})
    for r in _RECORDS:
        m.log(r)
    m.close()
    # offline runs keep their records in the run's .wandb file (protobuf records, keys and JSON values as
    # plain strings); wandb's service may still be writing it after finish() returns
    wanted = [b"train/lm_loss", b"train/learning_rate", b"runtime/tokens_per_sec", b"validation/lm_loss", b"2.75"]
    deadline = time.monotonic() + 30
    while True:
        data = b"".join(p.read_bytes() for p in (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))
        if all(w in data for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [w for w in wanted if w not in data] == []
    assert b"loss" not in data.replace(b"lm_loss", b"")  # only the grouped names were sent


def test_peak_is_the_best_ever_measured_per_device_dtype_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rates = iter([5e9, 2e9, 7e9])
    monkeypatch.setattr(metrics, "_measure_matmul", lambda dev, dtype: next(rates))
    measure = metrics.measure_peak_flops.__wrapped__  # bypass the per-process memo
    assert measure("cpu", torch.float32, 1) == 5e9
    assert measure("cpu", torch.float32, 1) == 5e9  # a slower (busier) measurement does not lower it
    assert measure("cpu", torch.bfloat16, 1) == 7e9  # its own entry
    cache = json.loads((tmp_path / "neox" / "matmul_peak.json").read_text())
    assert sorted(v for v in cache.values()) == [5e9, 7e9]


def test_real_measurement_is_positive():
    assert metrics._measure_matmul(torch.device("cpu"), torch.float32) > 0


def test_console_lines():
    line = metrics.format_record(
        {
            "iteration": 10,
            "loss": 2.5,
            "lr": 1e-3,
            "grad_norm": 0.5,
            "tokens_per_s": 1234.0,
            "mfu": 0.25,
            "peak_mem_bytes": 2**30,
        },
        100,
    )
    assert line == "iter     10/100 | loss 2.5000 | lr 1.000e-03 | grad 0.500 | 1,234 tok/s | mfu 25.0% | mem 1.00 GiB"
    assert metrics.format_record({"iteration": 5, "test_loss": 1.0, "test_ppl": 2.72}, 5).endswith("test ppl 2.72")
