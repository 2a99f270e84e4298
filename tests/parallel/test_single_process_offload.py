"""parallel.cpu_offload in one process (the CPU Adam role): FSDP2 over a one-rank group keeps weights, gradients
and optimizer state on the CPU, computes on the training device, trains as the plain process does and resumes
exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from neox.train.distributed import make_layout
from neox.train.trainer import Trainer
from tests.train.tiny_run import make_corpus, tiny_config

OFFLOAD = {"zero_stage": 3, "cpu_offload": True}


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus", docs=80)


@pytest.fixture(autouse=True)
def one_rank_group_is_removed_afterwards():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _fit(cfg, stop_at=None, layout=True):
    t = Trainer(cfg, quiet=True, layout=make_layout(cfg) if layout else None)
    t.fit(stop_at)
    return t


def test_one_process_offload_trains_like_the_plain_process(corpus, tmp_path):
    torch.set_num_threads(1)
    plain = _fit(tiny_config(corpus, tmp_path / "plain", eval={"eval_iters": 0}), layout=False)
    off = _fit(tiny_config(corpus, tmp_path / "off", eval={"eval_iters": 0}, parallel=OFFLOAD))
    params = list(off.model.parameters())
    assert all(isinstance(p, DTensor) and p.device.type == "cpu" for p in params)
    state = [v for s in off.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert state and all(v.device.type == "cpu" for v in state)
    assert off.losses == pytest.approx(plain.losses, abs=1e-5)
    assert plain.losses[-1] < plain.losses[0]


def test_one_process_offload_resumes_exactly(corpus, tmp_path):
    torch.set_num_threads(1)
    groups = dict(eval={"eval_iters": 0}, parallel=OFFLOAD)
    straight = _fit(tiny_config(corpus, tmp_path / "a", **groups))
    dist.destroy_process_group()
    first = _fit(tiny_config(corpus, tmp_path / "b", **groups), stop_at=10)
    dist.destroy_process_group()
    resumed = _fit(tiny_config(corpus, tmp_path / "b", checkpoint={"load": str(tmp_path / "b")}, **groups))
    assert first.losses + resumed.losses == straight.losses
