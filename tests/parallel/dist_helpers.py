"""Start a test worker script under torchrun (gloo, one thread per process) and fail with its output; inside a
worker, `strict_collectives()` makes every collective refuse a tensor its group's backend does not serve."""

from __future__ import annotations

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

HERE = Path(__file__).resolve().parent


def torchrun(script: str, nproc: int, *args: str, timeout: int = 300, extra: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *extra,
        str(HERE / script),
        *args,
    ]
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
