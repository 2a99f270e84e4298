"""4-bit block-wise weight storage (QLoRA, Dettmers et al., 2023) in plain PyTorch, for any device.

A weight is flattened and cut into blocks of 64 values; each block keeps its absolute maximum (fp32) and
every value the index (4 bits) of the code value nearest to value / absmax. Two indices share a byte, the
first in the high nibble (bitsandbytes' layout, so that its CUDA kernel can read the same bytes).

Codes:
- ``nf4``: NormalFloat4, the paper's information-theoretically optimal code for normally distributed
  weights: 8 positive and 7 negative quantiles of N(0, 1), an exact zero, normalised to [-1, 1]
  (`nf4_code`).
- ``fp4``: the 4-bit float E2M1 (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
  their negatives) divided by 6.

Double quantisation (the paper's, for the constants): the fp32 block maxima minus their mean are stored as
int8 with one fp32 scale per 256 of them, 8.1 instead of 32 bits per block of 64 weights (about 0.127
instead of 0.5 extra bits per weight). The paper keeps them in an 8-bit float; int8 over a centred block is
the finer grid for these positive, narrowly spread values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

BLOCK = 64  # weights per absmax
BLOCK2 = 256  # absmax constants per second-level scale (double quantisation)
KINDS = ("nf4", "fp4")


def nf4_code() -> list[float]:
    """The 16 NF4 values, ascending. Quantiles of N(0, 1) at probabilities spaced evenly from `offset` down
    to 1/2 (8 on the positive side, 7 on the negative side, so that zero is exact), each side divided by its
    largest value. offset = the mean of 1 - 1/(2*15) and 1 - 1/(2*16), as in the paper's appendix."""
    offset = ((1 - 1 / 30) + (1 - 1 / 32)) / 2
    inv = NormalDist().inv_cdf

    def side(n: int) -> list[float]:  # n quantiles at n + 1 evenly spaced probabilities, the last (1/2) dropped
        return [inv(offset + (0.5 - offset) * i / n) for i in range(n)]

    pos, neg = side(8), side(7)
    return sorted([-v / neg[0] for v in neg] + [0.0] + [v / pos[0] for v in pos])


def fp4_code() -> list[float]:
    """The 16 E2M1 values / 6, ascending (+0 and -0 both decode to zero)."""
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    return sorted([-m / 6.0 for m in mags] + [m / 6.0 for m in mags])


CODES = {"nf4": nf4_code, "fp4": fp4_code}


@dataclass
class Packed:
    """A 4-bit weight of n values: `data` uint8 [ceil(n / 2)], the block maxima (fp32 [ceil(n / 64)], or int8 `absmax_q` with fp32 `absmax_scale` [ceil(blocks / 256)] and `absmax_mean` [1])."""

    data: torch.Tensor
    absmax: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_mean: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


def code_table(kind: str, device=None) -> torch.Tensor:
    if kind not in CODES:
        raise ValueError(f"unknown 4-bit code {kind!r}; use one of {', '.join(KINDS)}")
    return torch.tensor(CODES[kind](), dtype=torch.float32, device=device)


@functools.cache
def _byte_table(kind: str, device: torch.device) -> torch.Tensor:
    code = code_table(kind, device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)


def byte_table(kind: str, device) -> torch.Tensor:
    """[256, 2] fp32: the two code values each byte holds (one gather per byte instead of per nibble)."""
    return _byte_table(kind, torch.device(device))


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, size)


@torch.no_grad()
def quantize(weight: torch.Tensor, kind: str = "nf4", double_quant: bool = False) -> Packed:
    """`weight` (any shape and float dtype) as 4-bit codes and block maxima, computed in fp32."""
    code = code_table(kind, weight.device)
    blocks = _blocks(weight.detach().float(), BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    # nearest code value: the index of the first midpoint at or above the value
    idx = torch.bucketize(scaled.reshape(-1), (code[1:] + code[:-1]) / 2).to(torch.uint8)
    data = ((idx[0::2] << 4) | idx[1::2])[: (weight.numel() + 1) // 2]  # the padding's codes are not kept
    if not double_quant:
        return Packed(data, absmax=absmax)
    mean = absmax.mean().reshape(1)
    centred = _blocks(absmax - mean, BLOCK2)
    scale = centred.abs().amax(dim=1) / 127.0
    q = torch.round(centred / torch.where(scale > 0, scale, 1.0)[:, None]).to(torch.int8)
    return Packed(data, absmax_q=q.reshape(-1)[: absmax.numel()], absmax_scale=scale, absmax_mean=mean)


def block_maxima(p: Packed) -> torch.Tensor:
    """The fp32 block maxima (double quantisation undone)."""
    if p.absmax is not None:
        return p.absmax
    n = p.absmax_q.numel()
    centred = _blocks(p.absmax_q.float(), BLOCK2) * p.absmax_scale[:, None]
    return centred.reshape(-1)[:n] + p.absmax_mean


def dequantize(p: Packed, shape: torch.Size | tuple, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` the codes stand for, in `dtype` (the product is formed in fp32)."""
    values = _blocks(byte_table(kind, p.data.device)[p.data.long()].view(-1), BLOCK) * block_maxima(p)[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(shape).to(dtype)


def nbytes(p: Packed) -> int:
    return sum(t.numel() * t.element_size() for t in p.tensors().values())


def bnb_dequantizer(bnb, device: torch.device):
    """bitsandbytes' NF4 dequantisation kernel for `device` (`bnb`: neox.kernels.bnb.load_bitsandbytes()),
    or None: when bitsandbytes is absent, or when its kernel fails or disagrees with `dequantize` on a probe
    weight there (a backend without the op, a build for another CUDA). It reads the same bytes."""
    if bnb is None:
        return None
    F = bnb.functional

    def run(p: Packed, shape, dtype: torch.dtype) -> torch.Tensor:
        state = F.QuantState(
            absmax=block_maxima(p),
            shape=torch.Size(shape),
            code=code_table("nf4", p.data.device),
            blocksize=BLOCK,
            quant_type="nf4",
            dtype=dtype,
        )
        return F.dequantize_4bit(p.data.view(-1, 1), quant_state=state)

    probe = torch.linspace(-3.0, 3.0, 3 * BLOCK + 2, device=device).reshape(2, -1)
    try:
        p = quantize(probe, "nf4")
        # its products may differ from ours in the last bit: the same grid, not the same rounding
        ok = torch.allclose(run(p, probe.shape, torch.float32), dequantize(p, probe.shape, "nf4", torch.float32))
    except Exception:
        return None
    return run if ok else None
