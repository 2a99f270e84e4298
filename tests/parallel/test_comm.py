"""Collectives get tensors on a device their group's backend serves: the device choice for each backend string,
process groups created with a device-qualified backend on GPUs (with the rank's GPU bound and the configured
timeout on every group), the strict check the multi-process workers install, and a scan that neox's own
collectives all go through neox.parallel.comm. Tests marked cuda repeat the real thing on a GPU."""

from __future__ import annotations

import ast
import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from neox.config.schema import ParallelConfig
from neox.errors import ConfigError
from neox.parallel import comm, mesh
from neox.parallel.mesh import ParallelDims, build_mesh, init_distributed, resolve_backend
from tests.parallel.dist_helpers import check_devices

PARALLEL = Path(mesh.__file__).resolve().parent
CPU, CUDA1 = torch.device("cpu"), torch.device("cuda", 1)


@pytest.mark.parametrize(
    "config, served",
    [
        ("nccl", {"cuda": "nccl"}),
        ("gloo", {"cpu": "gloo", "cuda": "gloo"}),
        ("cuda:nccl,cpu:gloo", {"cuda": "nccl", "cpu": "gloo"}),
        ("cpu:gloo", {"cpu": "gloo"}),
    ],
)
def test_backend_devices(config, served):
    assert comm.backend_devices(config) == served


@pytest.mark.parametrize(
    "config, device, expected",
    [
        # plain nccl refuses CPU tensors: they go to the current GPU (issue: loss broadcast, offloaded norms)
        ("nccl", CPU, torch.device("cuda", 3)),
        ("nccl", CUDA1, CUDA1),
        # a device-qualified group takes both where they are
        ("cuda:nccl,cpu:gloo", CPU, CPU),
        ("cuda:nccl,cpu:gloo", CUDA1, CUDA1),
        ("gloo", CPU, CPU),
        ("cpu:gloo", CUDA1, CPU),
    ],
)
def test_device_for(config, device, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm.device_for(config, device) == expected


@pytest.mark.parametrize(
    "backend, device_type, expected",
    [
        ("auto", "cuda", "cuda:nccl,cpu:gloo"),
        ("nccl", "cuda", "cuda:nccl,cpu:gloo"),
        ("gloo", "cuda", "gloo"),
        ("auto", "cpu", "gloo"),
        ("gloo", "cpu", "gloo"),
    ],
)
def test_resolve_backend_is_device_qualified_on_gpus(backend, device_type, expected):
    assert resolve_backend(backend, device_type) == expected


def test_nccl_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel.backend=nccl"):
        resolve_backend("nccl", "cpu")


@pytest.mark.parametrize("bad", [0, -1.0, True, "30"])
def test_timeout_must_be_positive(bad):
    with pytest.raises(ConfigError, match="dist_timeout_minutes"):
        ParallelDims.from_config(replace(ParallelConfig(), dist_timeout_minutes=bad), 1)


def test_strict_check_refuses_a_cpu_tensor_on_plain_nccl(monkeypatch):
    """What the workers' strict wrapper does with the original bug: a CPU tensor on a plain nccl group."""
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "nccl")
    with pytest.raises(AssertionError, match="backend 'nccl' got a tensor on cpu"):
        check_devices("dist.broadcast", None, [torch.zeros(())])
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl,cpu:gloo")
    check_devices("dist.broadcast", None, [torch.zeros(())])


# ---------------------------------------------------------------- init_distributed's process group


@pytest.fixture
def recorded_init(monkeypatch):
    """init_distributed as rank 1 of 2 with the group creation and mesh recorded instead of made."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(init=kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(set_device=d))
    monkeypatch.setattr(
        mesh, "build_mesh", lambda dims, device_type, timeout: calls.update(mesh=(device_type, timeout))
    )
    return calls


def test_init_on_gpus_binds_the_rank_device_with_the_timeout(recorded_init):
    init_distributed(replace(ParallelConfig(), dist_timeout_minutes=7.5), device=torch.device("cuda", 1))
    assert recorded_init["init"] == {
        "backend": "cuda:nccl,cpu:gloo",
        "timeout": timedelta(minutes=7.5),
        "device_id": torch.device("cuda", 1),
    }
    assert recorded_init["set_device"] == torch.device("cuda", 1)
    assert recorded_init["mesh"] == ("cuda", timedelta(minutes=7.5))


def test_init_bare_cuda_means_the_local_rank(recorded_init):
    init_distributed(ParallelConfig(), device="cuda")
    assert recorded_init["init"]["device_id"] == torch.device("cuda", 1)
    assert recorded_init["init"]["timeout"] == timedelta(minutes=30)


def test_init_on_cpu_binds_no_device(recorded_init):
    init_distributed(ParallelConfig(), device="cpu")
    assert recorded_init["init"] == {"backend": "gloo", "timeout": timedelta(minutes=30), "device_id": None}
    assert "set_device" not in recorded_init


# ---------------------------------------------------------------- a real (one-process) gloo group


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_mesh_groups_get_the_timeout(one_process_group):
    m = build_mesh(ParallelDims(world_size=1), "cpu", timedelta(minutes=3))
    for name in (*mesh.DIM_NAMES, "dp"):
        backend = mesh.submesh(m, name).get_group()._get_backend(CPU)
        assert backend.options._timeout == timedelta(minutes=3), name


def test_collectives_keep_cpu_tensors_on_gloo(one_process_group):
    t = torch.tensor([1.0, 2.0])
    assert comm.all_reduce_(t, None) is t and t.tolist() == [1.0, 2.0]
    assert comm.broadcast_(t, 0, None) is t
    out = torch.empty(2)
    assert comm.all_to_all_single_(out, t, None, [2], [2]) is out and out.tolist() == [1.0, 2.0]


# ---------------------------------------------------------------- every collective of neox.parallel asks comm

COLLECTIVES = {
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "send",
    "recv",
}
# Called directly, with the reason their tensor is on a device the group serves:
DIRECT = {
    # the collective helpers themselves
    ("comm.py", "all_reduce"),
    ("comm.py", "broadcast"),
    ("comm.py", "all_to_all_single"),
    # DDP communication hooks: the bucket lives where DDP put the gradients, which the group DDP was built on
    # (neox's, cuda:nccl,cpu:gloo on GPUs) serves; the packed signs are made on the bucket's device
    ("compress.py", "all_reduce"),
    ("compress.py", "all_gather_single"),
}


def test_neox_collectives_go_through_comm():
    direct = set()
    for path in PARALLEL.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            f = getattr(node, "func", None)
            if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and getattr(f.value, "id", None) == "dist":
                direct.add((path.name, f.attr))
    assert direct <= DIRECT, f"call neox.parallel.comm instead: {sorted(direct - DIRECT)}"
    assert ("comm.py", "all_reduce") in direct  # the scan sees calls at all


# ---------------------------------------------------------------- on a GPU


@pytest.fixture
def one_gpu_group(request):
    dist.init_process_group(request.param, init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.parametrize("one_gpu_group", ["cuda:nccl,cpu:gloo", "nccl"], indirect=True)
def test_cpu_and_cuda_tensors_on_a_gpu_group(one_gpu_group):
    for device in ("cpu", "cuda"):
        t = torch.tensor([1.0, 2.0], device=device)
        assert comm.all_reduce_(t, None).device.type == device and t.tolist() == [1.0, 2.0]
        assert comm.broadcast_(t, 0, None).device.type == device
