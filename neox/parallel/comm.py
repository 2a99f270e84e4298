"""Where a collective's tensor must live, and the collectives neox issues itself (metrics, the gradient norm, the
pipeline's tied embedding and loss broadcast).

A process group's backend serves some device types only: plain `nccl` takes CUDA tensors and fails on a CPU
one (a loss broadcast, the norm of CPU-offloaded gradients); `gloo` takes CPU (and some CUDA) tensors. neox
creates its groups with a device-qualified backend on GPUs (`cuda:nccl,cpu:gloo`, neox.parallel.mesh), so one
group serves both and tensors stay where they are; every collective here still asks `collective_device`, so a
group created by someone else with plain `nccl` gets its tensor moved to the current GPU (and back).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_devices(config: str) -> dict[str, str]:
    """Device type -> backend of a backend string as torch spells it (`dist.get_backend_config`): a plain name
    serves the device types torch lists for it (`nccl`: cuda; `gloo`: cpu and cuda), "dev:name,..." those named."""
    config = config.lower()
    if ":" not in config:
        return dict.fromkeys(dist.Backend.backend_capability.get(config, ("cpu", "cuda")), config)
    pairs = (item.split(":") for item in config.split(","))
    return {dev.strip(): name.strip() for dev, name in pairs}


def device_for(config: str, device: torch.device) -> torch.device:
    """Where a tensor on `device` must be for a collective on a group with backend string `config`: where it
    is when the backend serves that device type, else on the current device of a type it does serve
    (the current GPU for plain nccl, the CPU for a cpu-only group)."""
    served = backend_devices(config)
    if device.type in served:
        return device
    if "cuda" in served:
        return torch.device("cuda", torch.cuda.current_device())
    if "cpu" in served:
        return torch.device("cpu")
    raise RuntimeError(f"process group backend {config!r} serves none of cpu, cuda (tensor on {device})")


def collective_device(group, device: torch.device) -> torch.device:
    """`device_for` of `group`'s backend (None: the default group)."""
    return device_for(dist.get_backend_config(group), device)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `t` over `group`, wherever `t` lives; returns `t`."""
    dev = collective_device(group, t.device)
    work = t if dev == t.device else t.to(dev)
    dist.all_reduce(work, op=op, group=group)
    if work is not t:
        t.copy_(work)
    return t


def broadcast_(t: torch.Tensor, src: int, group) -> torch.Tensor:
    """In-place broadcast of `t` from global rank `src` over `group`, wherever `t` lives; returns `t`."""
    dev = collective_device(group, t.device)
    work = t if dev == t.device else t.to(dev)
    dist.broadcast(work, src=src, group=group)
    if work is not t:
        t.copy_(work)
    return t


def all_to_all_single_(out: torch.Tensor, t: torch.Tensor, group, out_splits=None, in_splits=None) -> torch.Tensor:
    """all_to_all_single of `t` into `out` over `group` (uneven splits as lists of rows per rank), wherever the
    tensors live; returns `out`."""
    dev = collective_device(group, t.device)
    send = t if dev == t.device else t.to(dev)
    recv = out if dev == out.device else torch.empty_like(out, device=dev)
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    if recv is not out:
        out.copy_(recv)
    return out
