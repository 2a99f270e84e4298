"""Gradient compression for data parallelism over slow links: DDP communication hooks.

`parallel.grad_compression` picks one:
- `fp16`: all-reduce in half precision (2x less traffic), torch's own hook.
- `powersgd`: torch's PowerSGD (low-rank, rank `parallel.powersgd_rank`, with error feedback).
- `onebit`: sign compression with error feedback, the communication idea behind GPT-NeoX/DeepSpeed 1-bit Adam
  (which DeepSpeed no longer ships). Each bucket is sent as one sign bit per element plus one float scale
  (mean |g|) per row of each parameter, about 32x less traffic than fp32 for wide rows; what that message failed to carry is kept in a
  per-bucket residual and added to the next step's gradient, so no gradient mass is ever lost, only delayed.

Compressed runs begin with `parallel.grad_compression_start_iter` uncompressed steps: DDP rebuilds its buckets
after the first step, and error feedback works better once the early large gradients have passed (GPT-NeoX's
1-bit Adam `freeze_step` plays the same role).

Only plain DDP (zero_stage 0, no tensor or pipeline parallelism) has communication hooks: FSDP2 reduces its own
gradients. `neox.parallel.apply` installs the hook on the data-parallel group.
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations as real types.
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from neox.errors import ConfigError

METHODS = ("none", "powersgd", "onebit", "fp16")

# Bit weights of one packed byte: element j of a group of 8 sets bit j.
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_bit_weights_on: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    """The bit weights on `device` (a gradient bucket's: a CUDA one under NCCL), copied there once."""
    w = _bit_weights_on.get(device)
    if w is None:
        w = _bit_weights_on[device] = _BIT_WEIGHTS.to(device)
    return w


def validate(pcfg) -> None:
    """Reject settings the hooks cannot honour; called before any process group work."""
    method = pcfg.grad_compression
    if method not in METHODS:
        raise ConfigError(f"parallel.grad_compression: {method!r} is not one of {', '.join(METHODS)}")
    if method == "none":
        return
    if pcfg.zero_stage != 0:
        raise ConfigError(
            f"parallel.grad_compression: {method} needs plain DDP (zero_stage: 0), got zero_stage: "
            f"{pcfg.zero_stage}; set grad_compression: none or zero_stage: 0"
        )
    if pcfg.model_parallel_size > 1 or pcfg.pipe_parallel_size > 1:
        # with DTensor weights or pipeline schedules gradients are reduced by FSDP2's replicate, not DDP
        raise ConfigError(
            f"parallel.grad_compression: {method} works with data parallelism alone; this layout has "
            f"model_parallel_size {pcfg.model_parallel_size}, pipe_parallel_size {pcfg.pipe_parallel_size}; "
            f"set grad_compression: none"
        )
    if method == "powersgd" and pcfg.powersgd_rank < 1:
        raise ConfigError(f"parallel.powersgd_rank: must be >= 1, got {pcfg.powersgd_rank}")
    if pcfg.grad_compression_start_iter < 0:
        raise ConfigError(f"parallel.grad_compression_start_iter: must be >= 0, got {pcfg.grad_compression_start_iter}")


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per element (1 = x >= 0), little-endian within each byte; the tail byte is zero-padded."""
    bits = (x.reshape(-1) >= 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) * _bit_weights(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `pack_signs` as +1/-1 values of `dtype`; `packed` may have leading batch dims."""
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)).ne(0)
    bits = bits.flatten(start_dim=-2)[..., :numel]
    return bits.to(dtype) * 2 - 1


class OneBitState:
    """Per-bucket error-feedback residuals and the step counter of the onebit hook."""

    def __init__(self, process_group: dist.ProcessGroup | None, start_iter: int):
        self.process_group = process_group
        self.start_iter = start_iter
        self.iter = 0
        self.residuals: dict[int, torch.Tensor] = {}


def _allreduce_mean(group, buffer: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    world = dist.get_world_size(group)
    buffer.div_(world)
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda f: (f.wait(), buffer)[1])


def _row_shapes(bucket: dist.GradBucket) -> list[tuple[int, int]]:
    """(rows, row length) of each parameter in bucket order; a 0-d or 1-d parameter is one row."""
    out = []
    for p in bucket.parameters():
        length = p.shape[-1] if p.dim() >= 2 else p.numel()
        out.append((p.numel() // max(length, 1), length))
    return out


def _row_scales(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    parts = flat.split([r * n for r, n in shapes])
    return torch.cat([part.view(r, n).abs().mean(dim=1) for part, (r, n) in zip(parts, shapes)])


def _expand_rows(scales: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    parts = scales.split([r for r, _ in shapes])
    return torch.cat([part.unsqueeze(1).expand(r, n).reshape(-1) for part, (r, n) in zip(parts, shapes)])


def onebit_hook(state: OneBitState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP hook: all-gather every rank's (sign bits, scales) of gradient + residual and average the decoded values."""
    group = state.process_group
    buffer = bucket.buffer()
    step = state.iter
    if bucket.is_last():
        state.iter += 1
    if step < state.start_iter:
        return _allreduce_mean(group, buffer)

    idx = bucket.index()
    residual = state.residuals.get(idx)
    if residual is None or residual.shape != buffer.shape or residual.dtype != buffer.dtype:
        residual = torch.zeros_like(buffer)
        state.residuals[idx] = residual
    corrected = buffer + residual
    # One scale per row (last dim) of every parameter: mean |c| is the scale that minimises ||c - s*sign(c)||^2,
    # and rows are where magnitudes differ (embedding rows of tokens absent from the batch are exactly zero:
    # with a row scale they cost nothing instead of injecting +-scale noise into every element).
    shapes = _row_shapes(bucket)
    scales = _row_scales(corrected, shapes).to(torch.float32)
    signs = torch.where(corrected >= 0, 1.0, -1.0).to(buffer.dtype)
    residual.copy_(corrected - _expand_rows(scales.to(buffer.dtype), shapes) * signs)

    numel, n_scale_bytes = buffer.numel(), 4 * scales.numel()
    payload = torch.cat([pack_signs(corrected), scales.view(torch.uint8)])
    world = dist.get_world_size(group)
    gathered = payload.new_empty(world * payload.numel())
    fut = dist.all_gather_single(gathered, payload, group=group, async_op=True).get_future()

    def decode(f) -> torch.Tensor:
        f.wait()
        # The future's value is the collective's input on some backends: read the output buffer instead.
        rows = gathered.view(world, -1)
        scales_all = rows[:, -n_scale_bytes:].contiguous().view(torch.float32).to(buffer.dtype)
        signs_all = unpack_signs(rows[:, :-n_scale_bytes], numel, buffer.dtype)
        mean = sum(signs_all[r] * _expand_rows(scales_all[r], shapes) for r in range(world)) / world
        buffer.copy_(mean)
        return buffer

    return fut.then(decode)


def register(ddp_model, pcfg, process_group: dist.ProcessGroup | None = None):
    """Install the hook chosen by `pcfg.grad_compression` on a DistributedDataParallel model.

    Returns the hook's state object (None for `none`/`fp16`) so callers and tests can inspect it.
    """
    validate(pcfg)
    method = pcfg.grad_compression
    if method == "none":
        return None
    if method == "fp16":
        ddp_model.register_comm_hook(process_group, default_hooks.fp16_compress_hook)
        return None
    if method == "powersgd":
        # PowerSGD's own warmup runs plain all-reduce; it insists on at least 2 steps with error feedback on.
        state = powerSGD_hook.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=pcfg.powersgd_rank,
            start_powerSGD_iter=max(2, pcfg.grad_compression_start_iter),
            use_error_feedback=True,
            warm_start=True,
        )
        ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    # Step 0 always runs uncompressed: DDP rebuilds its buckets after it, which would misfile residuals.
    state = OneBitState(process_group, max(1, pcfg.grad_compression_start_iter))
    ddp_model.register_comm_hook(state, onebit_hook)
    return state
