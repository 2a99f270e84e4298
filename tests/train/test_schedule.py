"""LR schedule against hand-computed GPT-NeoX AnnealingLR values."""

import math

import pytest

from neox.config.schema import ScheduleConfig
from neox.errors import ConfigError
from neox.train.schedule import LRSchedule


def sched(style, **kw):
    cfg = ScheduleConfig(lr_decay_style=style, **{"warmup_iters": 10, "min_lr": 0.0, **kw})
    return LRSchedule(cfg, lr=1.0, train_iters=110)


def test_warmup_is_linear_from_zero():
    s = sched("cosine")
    assert [s.lr_at(i) for i in (0, 1, 5, 10)] == [0.0, 0.1, 0.5, 1.0]


@pytest.mark.parametrize(
    "style,at_60,at_end",
    [
        ("constant", 1.0, 1.0),
        ("linear", 0.5, 0.0),  # (100 - 50) / 100
        ("cosine", 0.5, 0.0),  # (1 + cos(pi/2)) / 2
        ("exponential", math.exp(-0.693 / 2), math.exp(-0.693)),
    ],
)
def test_decay_styles(style, at_60, at_end):
    s = sched(style)
    assert s.lr_at(60) == pytest.approx(at_60)
    assert s.lr_at(110) == pytest.approx(at_end)
    assert s.lr_at(500) == pytest.approx(at_end)  # held after the decay span


def test_cosine_with_min_lr_and_quarter_point():
    s = sched("cosine", min_lr=0.1)
    # n = 25 of 100: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert s.lr_at(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert s.lr_at(110) == pytest.approx(0.1)


def test_linear_floors_at_min_lr():
    s = sched("linear", min_lr=0.2)
    assert s.lr_at(100) == pytest.approx(0.2)  # 0.1 before the floor


def test_warmup_fraction_of_decay_iters_and_decay_fraction():
    s = LRSchedule(ScheduleConfig(lr_decay_style="linear", warmup=0.1, lr_decay_iters=200), lr=2.0, train_iters=1000)
    assert (s.warmup_iters, s.decay_iters) == (20, 200)
    assert s.lr_at(10) == pytest.approx(1.0)
    s = LRSchedule(ScheduleConfig(lr_decay_style="linear", warmup=0.0, lr_decay_fraction=0.5), lr=1.0, train_iters=100)
    assert s.decay_iters == 50 and s.lr_at(25) == pytest.approx(0.5) and s.lr_at(0) == 1.0


def test_apply_sets_all_groups_and_reports_changes():
    import torch

    opt = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=9.0
    )
    s = sched("linear")
    assert s.apply(opt, 5) == 0.5
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    assert s.changes_from(s.state_dict()) == []
    assert s.changes_from({**s.state_dict(), "lr": 3.0}) == ["lr: 3.0 -> 1.0"]


def test_unknown_style_is_a_config_error():
    with pytest.raises(ConfigError, match="lr_decay_style"):
        LRSchedule(ScheduleConfig(lr_decay_style="cosine_restarts"), lr=1.0, train_iters=10)
