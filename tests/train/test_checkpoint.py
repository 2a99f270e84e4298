"""DCP checkpoints: round trip, atomic rename and `latest`, keep-last-N, weights-only loading."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from neox.errors import NeoxError
from neox.train import checkpoint as ckpt


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_rng_and_state(tmp_path):
    model, opt = make()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    out = ckpt.save(tmp_path, 7, model, opt, {"consumed_samples": 56}, {"train": {"seed": 1}})
    expect = (random.random(), np.random.rand(), torch.rand(1))
    assert out == tmp_path / "iter_0000007"
    assert (tmp_path / "latest").read_text().strip() == "iter_0000007"
    assert ckpt.saved_config(tmp_path) == {"train": {"seed": 1}}

    other, other_opt = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), None
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = ckpt.load(tmp_path, other, other_opt)
    assert state["iteration"] == 7 and state["consumed_samples"] == 56
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name])
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])


def test_keep_last_n_and_tmp_never_latest(tmp_path):
    model, opt = make()
    for it in (1, 2, 3, 4):
        ckpt.save(tmp_path, it, model, opt, {}, {}, keep_last_n=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000003", "iter_0000004"]
    # A crashed save leaves a .tmp directory: it is neither listed nor followed.
    (tmp_path / "iter_0000005.tmp").mkdir()
    assert ckpt.resolve(tmp_path).name == "iter_0000004"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)][-1] == "iter_0000004"
    # and the next save of that iteration replaces the leftover cleanly
    ckpt.save(tmp_path, 5, model, opt, {}, {})
    assert ckpt.resolve(tmp_path).name == "iter_0000005" and not (tmp_path / "iter_0000005.tmp").exists()


def test_crash_before_rename_keeps_previous_latest(tmp_path, monkeypatch):
    model, opt = make()
    ckpt.save(tmp_path, 1, model, opt, {}, {})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.yaml, "safe_dump", boom)
    with pytest.raises(ckpt.SaveError, match="disk full"):
        ckpt.save(tmp_path, 2, model, opt, {}, {})
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000001"]


def test_weights_only_and_errors(tmp_path):
    model, opt = make()
    ckpt.save(tmp_path, 3, model, opt, {}, {})
    fresh = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    assert ckpt.load_model_weights(tmp_path / "iter_0000003", fresh).name == "iter_0000003"
    assert torch.equal(fresh[0].weight, model[0].weight)
    with pytest.raises(NeoxError, match="not a checkpoint"):
        ckpt.resolve(tmp_path / "nowhere")
    wrong = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(NeoxError, match="does not match"):
        ckpt.load_model_weights(tmp_path, wrong)
    # `latest` naming a checkpoint that never finished: the newest complete one before it is used
    (tmp_path / "latest").write_text("iter_0000009\n")
    assert ckpt.resolve(tmp_path).name == "iter_0000003"
    for p in tmp_path.glob("iter_*/.metadata"):
        p.unlink()
    with pytest.raises(NeoxError, match="not a complete and intact checkpoint"):
        ckpt.resolve(tmp_path)
