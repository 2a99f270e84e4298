"""RNG state in checkpoints is per rank and per rank's own GPU (issue 11): a checkpoint written on a machine
with 4 GPUs resumes on one with 1 or none. GPU presence is faked; the checkpoint itself is real (ckpt.save /
ckpt.load) with its trainer_state.pt rewritten as a 4-GPU rank would have written it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from neox.train import checkpoint as ckpt

CUDA_STATES = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # one per GPU of the saving machine


@pytest.fixture
def cuda(monkeypatch):
    """Fake CUDA with `n` devices (current device `current`); records set_rng_state calls."""
    calls = []

    def fake(n: int, current: int = 0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": CUDA_STATES[current])
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))

        def refuse(*a, **k):
            raise AssertionError("every GPU's RNG state touched: only the rank's own device's should be")

        monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
        return calls

    return fake


def test_saves_only_the_current_gpu_state(cuda):
    cuda(4, current=2)
    state = ckpt.rng_state()
    assert torch.equal(state["cuda"], CUDA_STATES[2])


def _checkpoint(tmp_path, cuda_state):
    """A real checkpoint whose rank-0 RNG entry is what a rank on a 4-GPU machine saved."""
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    ckpt.save(tmp_path, 1, model, opt, {}, {})
    expect = (random.random(), np.random.rand(), torch.rand(1))
    path = tmp_path / "iter_0000001" / ckpt.STATE_FILE
    state = torch.load(path, weights_only=False)
    state["rng"][0]["cuda"] = cuda_state
    torch.save(state, path)
    (path.parent / ckpt.MANIFEST).unlink()  # edited by hand: the manifest no longer matches it
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    return model, opt, expect


def _resume(tmp_path, model, opt, expect):
    ckpt.load(tmp_path, model, opt)
    assert (random.random(), np.random.rand()) == pytest.approx(expect[:2]) and torch.equal(torch.rand(1), expect[2])


@pytest.mark.parametrize("saved", [CUDA_STATES[2], CUDA_STATES], ids=["own device", "every device (old format)"])
def test_resume_without_gpus_restores_the_cpu_streams(tmp_path, cuda, saved):
    model, opt, expect = _checkpoint(tmp_path, saved)
    calls = cuda(0)
    _resume(tmp_path, model, opt, expect)
    assert calls == []


def test_resume_on_one_gpu_restores_the_rank_state_there(tmp_path, cuda):
    model, opt, expect = _checkpoint(tmp_path, CUDA_STATES[2])  # rank on cuda:2 of 4
    calls = cuda(1)
    _resume(tmp_path, model, opt, expect)
    assert len(calls) == 1 and torch.equal(calls[0][0], CUDA_STATES[2]) and calls[0][1] == "cuda"


@pytest.mark.parametrize(
    "saved, current, restored",
    [(CUDA_STATES, 0, CUDA_STATES[0]), (CUDA_STATES[:1], 5, None)],
    ids=["current device saved", "current device not saved: the GPU stream starts from its seed"],
)
def test_old_all_device_list_restores_the_current_device_entry_or_nothing(tmp_path, cuda, saved, current, restored):
    model, opt, expect = _checkpoint(tmp_path, saved)
    calls = cuda(8, current=current)
    _resume(tmp_path, model, opt, expect)
    if restored is None:
        assert calls == []
    else:
        assert len(calls) == 1 and torch.equal(calls[0][0], restored)


@pytest.mark.cuda
def test_real_gpu_round_trip():
    torch.cuda.manual_seed(3)
    state = ckpt.rng_state()
    assert isinstance(state["cuda"], torch.Tensor)
    expect = torch.rand(4, device="cuda")
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expect)
