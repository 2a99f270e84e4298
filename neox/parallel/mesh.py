"""The parallel layout: validated sizes (`ParallelDims`) and the one `DeviceMesh` with named dims built from them.

Every layout check here is plain arithmetic on the config and the world size, so an impossible layout is a
one-line `ConfigError` before any process group exists (and before `neox train --nproc N` starts torchrun).

The mesh always has all four dims, in this order, size 1 where unused, so code can ask for `mesh["tp"]` or
`mesh["pp"]` without checking what is enabled:

    pp            pipeline stages (outermost: stage-to-stage traffic is the lightest)
    dp_replicate  data-parallel replicas (DDP for ZeRO 0; the replicate dim of HSDP)
    dp_shard      data-parallel shards (FSDP2 for ZeRO 1/2/3)
    tp            tensor parallel (innermost: the chattiest, kept on neighbouring ranks)

With expert parallelism the flattened data-parallel ranks are also seen as a 2-D mesh (`expert_mesh`):
ep_replicate x ep, ep innermost (the ranks exchanging tokens by all-to-all), ep_replicate the ranks holding
the same experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from neox.errors import ConfigError

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")
EXPERT_DIM_NAMES = ("ep_replicate", "ep")  # the flattened dp dim seen by expert parallelism
BACKENDS = ("auto", "gloo", "nccl")
# On GPUs every group is created with both: NCCL carries CUDA tensors, gloo the CPU ones (a loss broadcast,
# the norm of CPU-offloaded gradients), which a plain "nccl" group refuses.
CUDA_BACKEND = "cuda:nccl,cpu:gloo"


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each mesh dim for one run; `pp * dp_replicate * dp_shard * tp == world_size`."""

    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    ep: int = 1  # expert-parallel ranks (neox.parallel.expert): a divisor of dp, innermost within it

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)

    @property
    def fsdp(self) -> bool:
        """Whether data parallelism goes through FSDP2 (ZeRO 1-3) rather than DDP (ZeRO 0)."""
        return self.zero_stage > 0

    @property
    def sp(self) -> bool:
        """Sequence parallelism is only meaningful with tensor parallelism."""
        return self.sequence_parallel and self.tp > 1

    def describe(self) -> str:
        hsdp = self.dp_replicate > 1 and self.dp_shard > 1
        dp = f"dp={self.dp_replicate}x{self.dp_shard}" if hsdp else f"dp={self.dp}"
        mode = "DDP" if not self.fsdp else ("HSDP" if self.dp_replicate > 1 else "FSDP2")
        sp = "+sp" if self.sp else ""
        return f"world={self.world_size} pp={self.pp} {dp} tp={self.tp}{sp} zero={self.zero_stage} ({mode})"

    @classmethod
    def from_mesh(cls, mesh, pcfg) -> ParallelDims:
        """The dims of an existing mesh (built by build_mesh) with the config's ZeRO stage and SP flag."""
        sizes = {name: mesh[name].size() for name in DIM_NAMES}
        return cls(
            world_size=mesh.size(),
            zero_stage=pcfg.zero_stage,
            sequence_parallel=bool(pcfg.sequence_parallel),
            ep=getattr(pcfg, "expert_parallel_size", 1),
            **sizes,
        )

    @classmethod
    def from_config(cls, pcfg, world_size: int, model_cfg=None, source: str = "config") -> ParallelDims:
        """Validate `pcfg` (ParallelConfig) against `world_size` and, when given, the model's shapes.

        The data-parallel size is what is left of the world after pipeline and tensor parallelism; ZeRO 0
        makes all of it replication (DDP), ZeRO 1-3 shards it (FSDP2), optionally inside `dp_replicate`
        replicas (HSDP).
        """
        pp, tp, rep = pcfg.pipe_parallel_size, pcfg.model_parallel_size, pcfg.dp_replicate
        for key, value in (
            ("pipe_parallel_size", pp),
            ("model_parallel_size", tp),
            ("dp_replicate", rep),
            ("pipe_stages_per_rank", pcfg.pipe_stages_per_rank),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{source}: parallel.{key} must be a positive integer, got {value!r}")
        if pcfg.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{source}: parallel.zero_stage must be 0, 1, 2 or 3, got {pcfg.zero_stage!r}")
        if pcfg.backend not in BACKENDS:
            raise ConfigError(f"{source}: parallel.backend must be one of {', '.join(BACKENDS)}, got {pcfg.backend!r}")
        timeout = pcfg.dist_timeout_minutes
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"{source}: parallel.dist_timeout_minutes must be a positive number, got {timeout!r}")
        if world_size < 1:
            raise ConfigError(f"{source}: world size must be at least 1, got {world_size}")
        if world_size % (pp * tp):
            raise ConfigError(
                f"{source}: world size {world_size} is not divisible by pipe_parallel_size * model_parallel_size"
                f" = {pp} * {tp}; use a process count that is a multiple of {pp * tp} or change those sizes"
            )
        dp = world_size // (pp * tp)
        if pcfg.zero_stage == 0:
            if rep > 1:
                raise ConfigError(
                    f"{source}: parallel.dp_replicate={rep} (HSDP) needs zero_stage 1, 2 or 3; with zero_stage 0 "
                    f"all {dp} data-parallel ranks already replicate (DDP): remove dp_replicate or raise zero_stage"
                )
            if pcfg.cpu_offload:
                raise ConfigError(
                    f"{source}: parallel.cpu_offload needs zero_stage 1, 2 or 3 (FSDP2 offload); "
                    f"set zero_stage or turn cpu_offload off"
                )
            rep, shard = dp, 1
        else:
            if dp % rep:
                raise ConfigError(
                    f"{source}: data-parallel size {dp} (world {world_size} / pp {pp} / tp {tp}) is not divisible "
                    f"by parallel.dp_replicate={rep}; pick a dp_replicate that divides {dp}"
                )
            shard = dp // rep
        dims = cls(
            world_size=world_size,
            pp=pp,
            dp_replicate=rep,
            dp_shard=shard,
            tp=tp,
            zero_stage=pcfg.zero_stage,
            sequence_parallel=bool(pcfg.sequence_parallel),
            ep=getattr(pcfg, "expert_parallel_size", 1),
        )
        if dims.ep > 1 and dims.dp % dims.ep:
            raise ConfigError(
                f"{source}: parallel.expert_parallel_size={dims.ep} must divide the data-parallel size {dims.dp} "
                f"(world {world_size} / pp {pp} / tp {tp}); run a multiple of {dims.ep * pp * tp} processes or change it"
            )
        if model_cfg is not None:
            dims.check_model(model_cfg, pcfg, source)
        return dims

    def check_model(self, mcfg, pcfg, source: str = "config") -> None:
        """Shapes the tensor- and pipeline-parallel plans need to split evenly."""
        tp = self.tp
        heads = mcfg.num_attention_heads
        kv = mcfg.num_kv_heads or heads
        if heads % kv:
            raise ConfigError(f"{source}: model.num_attention_heads={heads} is not divisible by num_kv_heads={kv}")
        if tp > 1:
            if heads % tp:
                raise ConfigError(
                    f"{source}: model.num_attention_heads={heads} is not divisible by "
                    f"model_parallel_size={tp}; each tensor-parallel rank needs whole heads"
                )
            if kv % tp:
                raise ConfigError(
                    f"{source}: model.num_kv_heads={kv} is not divisible by model_parallel_size={tp}; "
                    f"each tensor-parallel rank needs whole key/value groups"
                )
            if mcfg.vocab_size is not None and mcfg.vocab_size % tp:
                raise ConfigError(
                    f"{source}: model.vocab_size={mcfg.vocab_size} is not divisible by "
                    f"model_parallel_size={tp}; leave vocab_size unset to pad it automatically"
                )
            inter = mcfg.intermediate_size
            if inter is not None and inter % tp:
                raise ConfigError(
                    f"{source}: model.intermediate_size={inter} is not divisible by model_parallel_size={tp}"
                )
            if self.sp and mcfg.seq_length % tp:
                raise ConfigError(
                    f"{source}: sequence_parallel needs model.seq_length={mcfg.seq_length} divisible "
                    f"by model_parallel_size={tp}"
                )
        stages = self.pp * pcfg.pipe_stages_per_rank
        if self.pp > 1 and mcfg.num_layers < stages:
            raise ConfigError(
                f"{source}: model.num_layers={mcfg.num_layers} is fewer than the {stages} pipeline "
                f"stages (pipe_parallel_size {self.pp} * pipe_stages_per_rank "
                f"{pcfg.pipe_stages_per_rank}); use fewer stages"
            )


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun / Slurm-launched torchrun set them; (0, 0, 1) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def resolve_backend(backend: str, device_type: str) -> str:
    """The backend string process groups are created with for `parallel.backend` on `device_type`: on CUDA,
    auto and nccl mean CUDA_BACKEND (NCCL for every CUDA tensor, gloo for the CPU ones)."""
    if backend == "gloo":
        return "gloo"
    if device_type == "cuda":
        return CUDA_BACKEND
    if backend == "nccl":
        raise ConfigError("parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    return "gloo"


def dist_timeout(pcfg) -> timedelta:
    """How long a collective may wait for the other ranks before the run fails (parallel.dist_timeout_minutes)."""
    return timedelta(minutes=pcfg.dist_timeout_minutes)


def build_mesh(dims: ParallelDims, device_type: str = "cpu", timeout: timedelta | None = None):
    """The 4-D DeviceMesh (pp, dp_replicate, dp_shard, tp) plus a flattened "dp" dim for data-parallel
    collectives (loss averaging, the loader's rank). The default process group must already exist; its
    subgroups inherit its backend. `timeout` is given to every group of the mesh (torch creates them with
    its default)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != dims.world_size:
        raise ConfigError(f"layout is for {dims.world_size} processes but {dist.get_world_size()} are running")
    mesh = init_device_mesh(device_type, dims.shape, mesh_dim_names=DIM_NAMES)
    submesh(mesh, "dp")  # create the flattened group now, on every rank together
    if dims.ep > 1:
        # the dp ranks as (ep_replicate, ep), ep innermost; unflattening creates groups, so once, here
        mesh._neox_expert_mesh = submesh(mesh, "dp")._unflatten(0, (dims.dp // dims.ep, dims.ep), EXPERT_DIM_NAMES)
    if timeout is not None:
        for name in (*DIM_NAMES, "dp"):
            submesh(mesh, name).get_group().set_timeout(timeout)
        if dims.ep > 1:
            for name in EXPERT_DIM_NAMES:
                expert_mesh(mesh)[name].get_group().set_timeout(timeout)
    return mesh


def expert_mesh(mesh):
    """The data-parallel ranks as a 2-D mesh ("ep_replicate", "ep") built with `mesh` (expert_parallel_size > 1):
    "ep" the ranks exchanging tokens by all-to-all, "ep_replicate" those holding the same experts."""
    return mesh._neox_expert_mesh


def submesh(mesh, name: str):
    """One named dim of the mesh; "dp" is the flattened (dp_replicate, dp_shard) mesh, which torch wants kept
    apart from the root mesh (`_flatten` is idempotent, so asking again returns the same mesh)."""
    if name == "dp":
        return mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh[name]


def init_distributed(pcfg, model_cfg=None, device="cpu", source: str = "config"):
    """Validate the layout for this process's world, then create the default group and the mesh.

    `device` is this rank's device (neox.kernels.device.resolve_device gives each torchrun rank its own GPU;
    a bare "cuda" here means cuda:LOCAL_RANK). The group is bound to that GPU (`device_id`: NCCL connects
    eagerly and the mesh's groups are split from it) and waits `parallel.dist_timeout_minutes` for a
    collective. Returns (dims, mesh); mesh is None for a single process, which runs without torch.distributed.
    """
    _, local_rank, world = world_from_env()
    dims = ParallelDims.from_config(pcfg, world, model_cfg, source)  # raises before any group exists
    if world == 1 and not pcfg.cpu_offload:
        return dims, None
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    backend = resolve_backend(pcfg.backend, device.type)
    timeout = dist_timeout(pcfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # one process with cpu_offload (the CPU Adam role: weights, gradients and optimizer state on the CPU,
        # the forward and backward on the device) runs FSDP2 over a one-rank group, which needs no launcher
        solo = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if world == 1 else {}
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id, **solo)
    return dims, build_mesh(dims, device.type, timeout)


def dp_rank_and_size(mesh) -> tuple[int, int]:
    """This rank's position among the data-parallel ranks (what the data loader slices by)."""
    if mesh is None:
        return 0, 1
    dp = submesh(mesh, "dp")
    return dp.get_local_rank(), dp.size()


def is_logging_rank(mesh) -> bool:
    """The one rank that writes logs and metrics: first dp and tp rank of the last pipeline stage, where the
    loss is known."""
    if mesh is None:
        return True
    return (
        mesh["pp"].get_local_rank() == mesh["pp"].size() - 1
        and submesh(mesh, "dp").get_local_rank() == 0
        and mesh["tp"].get_local_rank() == 0
    )


def group(mesh, name: str):
    """Process group of one mesh dim (or the flattened "dp"); None when running a single process."""
    return None if mesh is None else submesh(mesh, name).get_group()
