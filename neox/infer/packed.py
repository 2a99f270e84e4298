"""Linear layers run on oneDNN-packed weights while decoding eagerly on CPU.

A decode step multiplies a handful of rows by every weight of the model, so it is bound by how fast the GEMM
reads the weights. PyTorch's default CPU path (MKL sgemm for fp32, oneDNN with a plain layout for bf16) reads
them at about half the rate oneDNN reaches once a weight is reordered into its own blocked layout (what
inductor's freezing does for a compiled step). Measured on a 2-core AMD EPYC (Zen 4, avx512_bf16), one thread,
min of 20: bf16 [1, 512] x [50304, 512]^T 6.4 -> 3.6 ms, [8, 512] x [2048, 512]^T 0.19 -> 0.13 ms; fp32 at
batch 8 about 2x as well. fp32 at batch 1 gains nothing (MKL's GEMV is as fast on the layers, and faster on
the output weight stored transposed: neox.infer.gemv_layout), so there only that is done.

Packing copies each weight (about a decode step's worth of time for the largest), so the packed copies are
kept per model and reused by later generations until a weight changes; they hold a second copy of the
weights, which is made only when it fits comfortably in the memory available (MEMORY_SHARE).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import nn

from neox.infer.tensor_parallel import is_dtensor
from neox.kernels.bf16_cpu import cpu_lacks_bf16

MEMORY_SHARE = 0.25  # pack only when the copies take at most this share of the memory available now

_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (versions, {linear: packed weight})


@functools.cache
def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def packable(model, batch: int) -> list[nn.Linear]:
    """The plain nn.Linear layers worth packing for decoding `batch` rows: CPU, bf16 at any batch, fp32 with
    more than one row (bf16 only where the CPU has bf16 arithmetic). Subclasses (LoRA, quantized layers) and tensor-parallel shards keep their own forward."""
    if not onednn_available():
        return []
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m) is not nn.Linear or w is None or w.device.type != "cpu" or is_dtensor(w):
            continue
        # without bf16 units a packed bf16 GEMM is emulated: neox.kernels.bf16_cpu's fp32 blocks are faster
        if (w.dtype == torch.bfloat16 and not cpu_lacks_bf16()) or (w.dtype == torch.float32 and batch > 1):
            out.append(m)
    return out


def _versions(linears) -> tuple:
    return tuple((id(m.weight), m.weight.data_ptr(), m.weight._version) for m in linears)


def _fits(linears) -> bool:
    need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    avail = _available_bytes()
    return avail is None or need <= MEMORY_SHARE * avail


def packed_weights(model, linears: list[nn.Linear]) -> dict | None:
    """{linear: packed weight} for `model`, packed again when any of the weights changed; None when the
    copies would not fit."""
    versions = _versions(linears)
    cached = _packed.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    _packed.pop(model, None)  # the old copies go before new ones are made
    if not _fits(linears):
        return None
    with torch.inference_mode():
        packed = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1) for m in linears}
    _packed[model] = (versions, packed)
    return packed


def release(model) -> None:
    """Drop the packed copies of `model`'s weights."""
    _packed.pop(model, None)


def _packed_forward(module: nn.Linear, weight: torch.Tensor):
    op, plain, bias = torch.ops.mkldnn._linear_pointwise, type(module).forward.__get__(module), module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != weight.dtype:  # e.g. fp32 activations reaching a bf16 layer: the plain path decides
            return plain(x)
        return op(x, weight, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def packed_linears(model, batch: int):
    """Within the block, the model's packable linears multiply by their packed weights (same values, same
    shapes; results equal to rounding). Yields the number of layers packed."""
    if torch.is_autocast_enabled("cpu"):
        yield 0
        return
    linears = packable(model, batch)
    packed = packed_weights(model, linears) if linears else None
    if not packed:
        yield 0
        return
    for m, w in packed.items():
        m.forward = _packed_forward(m, w)
    try:
        yield len(packed)
    finally:
        for m in packed:
            m.__dict__.pop("forward", None)
