"""profile: true writes a Chrome trace, the operator table and a memory record of the chosen steps only."""

from __future__ import annotations

import json

import pytest
import torch

from neox.config import load
from neox.config.schema import LoggingConfig
from neox.errors import ConfigError
from neox.train.profiling import StepProfiler
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config


def _step(model, opt):
    loss = model(torch.randn(8, 32)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_profiles_the_steps_from_start_to_stop_and_writes_each_file(tmp_path):
    cfg = LoggingConfig(profile=True, profile_step_start=2, profile_step_stop=3)
    prof = StepProfiler(cfg, tmp_path, torch.device("cpu"), rank=0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters())
    started = []
    for i in range(6):
        prof.before_step(i)
        started.append(prof._prof is not None)
        with torch.profiler.record_function(f"neox_test_step_{i}"):
            _step(model, opt)
        prof.after_step(i)
    prof.close()
    assert started == [False, False, True, True, False, False]
    names = sorted(p.name for p in prof.written)
    assert names == ["memory_timeline_rank0.json", "ops_rank0.txt", "trace_rank0.json"]
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("neox_test_step_")}
    assert steps == {"neox_test_step_2", "neox_test_step_3"}  # exactly the profiled steps
    assert "aten::addmm" in (tmp_path / "profile" / "ops_rank0.txt").read_text()
    timeline = json.loads((tmp_path / "profile" / "memory_timeline_rank0.json").read_text())
    assert len(timeline) == 2 and len(timeline[0]) > 0  # timestamps and bytes per category


def test_a_run_ending_inside_the_window_still_writes_what_it_recorded(tmp_path):
    cfg = LoggingConfig(profile=True, profile_step_start=0, profile_step_stop=100, profile_dir=str(tmp_path / "p"))
    prof = StepProfiler(cfg, None, torch.device("cpu"), rank=3)
    model = torch.nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prof.before_step(0)
    _step(model, opt)
    prof.after_step(0)
    prof.close()
    assert (tmp_path / "p" / "trace_rank3.json").is_file()


def test_stop_before_start_is_a_config_error(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("profile: true\nprofile_step_start: 5\nprofile_step_stop: 2\n")
    with pytest.raises(ConfigError, match="profile_step_stop"):
        load([str(path)])


def test_a_training_run_with_profile_true_writes_the_trace(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", docs=60)
    logging = {"log_interval": 2, "progress_bar": False, "profile": True, "profile_step_start": 2}
    cfg = tiny_config(corpus, tmp_path / "run", train={"train_iters": 6}, logging={**logging, "profile_step_stop": 3})
    Trainer(cfg, quiet=True).fit()
    trace = json.loads((tmp_path / "run" / "profile" / "trace_rank0.json").read_text())
    assert any(e.get("name") == "aten::scaled_dot_product_attention" for e in trace["traceEvents"])
