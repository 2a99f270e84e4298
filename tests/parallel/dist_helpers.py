"""Start a test worker script under torchrun (gloo, one thread per process) and fail with its output; inside a
worker, `strict_collectives()` makes every collective refuse a tensor its group's backend does not serve."""

from __future__ import annotations

import atexit
import collections
import functools
import inspect
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from neox.parallel.comm import backend_devices
from tests.forkserver import RUNTIME_ONLY, ForkServer

HERE = Path(__file__).resolve().parent


FRESH_WORKERS = "NEOX_TEST_FRESH_WORKERS"  # set (to anything): every worker a fresh interpreter, as torchrun starts
_workers: dict = {}  # "server": the running fork server, "key": the environment it was started with


def _worker_server(env: dict[str, str]) -> ForkServer:
    """The session's fork server for torchrun's workers (tests/forkserver.py, "worker" mode): each worker is
    `python -u SCRIPT ARGS` forked from a process that has imported torch.distributed and neox's trainer once,
    instead of a fresh interpreter paying seconds of imports per rank. Started on first use, and again when the
    environment has changed since (a test set a variable), so that the workers import under the one they get."""
    key = sorted((k, v) for k, v in env.items() if k not in RUNTIME_ONLY)
    if _workers.get("key") != key:
        if "server" in _workers:
            _workers.pop("server").close()
        else:
            atexit.register(lambda: _workers["server"].close() if "server" in _workers else None)
        _workers["server"], _workers["key"] = ForkServer(env, HERE.parents[1], mode="worker"), key
    return _workers["server"]


def torchrun(script: str, nproc: int, *args: str, timeout: int = 300, extra: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra]
    if os.environ.get(FRESH_WORKERS):
        cmd = [*launch, str(HERE / script), *args]
    else:
        server = _worker_server(env)
        cmd = [*launch, "--no-python", str(server.program), str(HERE / script), *args]
        env = server.path_env(env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_cases(script: str, nproc: int, cases: list, tmp_path: Path, timeout: int = 300) -> dict:
    """Hand `cases` to a worker that runs them all in one launch (`script OUT.json CASES.json`); its results."""
    import json

    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun(script, nproc, str(tmp_path / "out.json"), str(tmp_path / "cases.json"), timeout=timeout)
    return json.loads((tmp_path / "out.json").read_text())


# c10d collectives with a tensor (or list of tensors) and a `group` argument; point-to-point traffic is checked
# where it is issued as a batch (wrapping isend/irecv themselves would fail P2POp's identity check).
C10D = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
)
# functional collectives (DTensor redistribution, FSDP2's norm of sharded gradients); group: a ProcessGroup,
# a (mesh, dim) pair, a mesh or a group name
FUNCOL = ("all_reduce", "all_gather_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single")


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


def check_devices(api: str, group, tensors, seen: collections.Counter | None = None) -> None:
    """Raise unless every tensor lives on a device type the group's backend serves (dist.get_backend_config:
    plain "nccl" serves cuda only, "gloo" cpu and cuda, "cuda:nccl,cpu:gloo" each named type)."""
    config = dist.get_backend_config(group)
    served = backend_devices(config)
    for t in tensors:
        if t.device.type not in served:
            raise AssertionError(f"{api} on a group with backend {config!r} got a tensor on {t.device}")
        if seen is not None:
            seen[f"{api} {t.device.type} via {served[t.device.type]}"] += 1


def _funcol_group(group):
    return dist.distributed_c10d._resolve_process_group(funcol._resolve_group_name(group))


def _wrap(module, name: str, api: str, resolve, seen):
    fn = getattr(module, name)
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        check_devices(api, resolve(group), _tensors(bound.arguments.values()), seen)
        return fn(*args, **kwargs)

    setattr(module, name, checked)


def strict_collectives() -> collections.Counter:
    """Wrap torch.distributed's collectives (and the functional ones DTensor uses) in this process so a
    tensor on a device its group's backend does not serve raises at once, naming both. Returns the counter of
    checked tensors by "api device via backend", so a test can see the checks ran."""
    seen: collections.Counter = collections.Counter()
    for name in C10D:
        _wrap(dist, name, f"dist.{name}", lambda g: g, seen)
    for name in FUNCOL:
        if hasattr(funcol, name):
            _wrap(funcol, name, f"funcol.{name}", _funcol_group, seen)
    batch = dist.batch_isend_irecv

    @functools.wraps(batch)
    def checked_batch(p2p_op_list):
        for op in p2p_op_list:
            check_devices("dist.batch_isend_irecv", op.group, [op.tensor], seen)
        return batch(p2p_op_list)

    dist.batch_isend_irecv = checked_batch
    return seen
