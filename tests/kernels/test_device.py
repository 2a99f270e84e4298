"""resolve_device: names as users write them, and under torchrun each rank's own GPU whatever index the config
names (issue 11: `train.device: cuda:0` put every rank on GPU 0). CUDA presence and counts are faked."""

from __future__ import annotations

import pytest
import torch

from neox.errors import NeoxError
from neox.kernels.device import resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has `n` GPUs (and launch as `local_rank` of a `world`-process torchrun job)."""

    def fake(n: int, local_rank: int | None = None, world: int = 4):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        if local_rank is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
            monkeypatch.delenv("LOCAL_RANK", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("LOCAL_RANK", str(local_rank))

    return fake


@pytest.mark.parametrize("name", ["cuda:0", "cuda", "cuda:3", "auto"])
def test_torchrun_rank_gets_its_own_gpu(gpus, name):
    gpus(4, local_rank=2)
    assert resolve_device(name, "train.device") == torch.device("cuda", 2)


def test_one_visible_gpu_per_process_is_cuda_0(gpus):
    gpus(1, local_rank=3)  # a launcher that sets CUDA_VISIBLE_DEVICES per process
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_more_local_ranks_than_gpus_is_one_line(gpus):
    gpus(2, local_rank=2)
    with pytest.raises(NeoxError, match="train.device: local rank 2 needs a GPU of its own but this machine shows 2"):
        resolve_device("cuda", "train.device")


def test_single_process_keeps_the_named_gpu(gpus):
    gpus(4)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    gpus(4, local_rank=0, world=1)  # torchrun with one process
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cpu_is_cpu_under_torchrun(gpus):
    gpus(0, local_rank=1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name, msg", [("cuda", "CUDA is not available"), ("bogus", "not a device")])
def test_bad_names(gpus, name, msg):
    gpus(0)
    with pytest.raises(NeoxError, match=msg):
        resolve_device(name, "--device")
