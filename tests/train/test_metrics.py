"""metrics.jsonl writing, optional writers' errors, the cached matmul peak and console lines."""

import importlib.util
import json

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


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_extra_is_a_clear_error(tmp_path):
    with pytest.raises(NeoxError, match=r"neox\[tensorboard\]"):
        metrics.Metrics(tmp_path, LoggingConfig(tensorboard_dir=str(tmp_path / "tb")))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_extra_is_a_clear_error(tmp_path):
    with pytest.raises(NeoxError, match=r"neox\[wandb\]"):
        metrics.Metrics(tmp_path, LoggingConfig(use_wandb=True))


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
