"""QLoRA (Dettmers et al., 2023): LoRA over frozen base weights stored in 4 bits.

`quantize_base_` replaces nn.Linear layers (the LoRA targets, or every one) by `Linear4bit`: the weight
becomes the 4-bit codes and block maxima of `neox.kernels.nf4` (buffers, so checkpoints hold exactly what
the run trains against and a resume is bitwise), the bias stays a frozen parameter, and the adapters move
over unchanged. Forward dequantises the weight into the compute dtype (autocast's, else the input's) for
the one matmul and lets it go; backward dequantises it again, so a full-precision copy of a weight never
outlives its layer's matmul (autograd would otherwise keep every layer's for the backward pass).

State-dict keys of a quantized layer: ``weight_4bit`` (uint8, two codes a byte), ``weight_absmax`` (fp32, one
per 64 weights) or, with double quantisation, ``weight_absmax_q`` / ``weight_absmax_scale`` /
``weight_absmax_mean``; ``bias`` and ``lora_A`` / ``lora_B`` as before. `dequantize_base_` turns the layers
back into nn.Linear with the dequantised weights, which `neox.model.lora.merge_lora_` then folds the
adapters into (inference, neox export hf).

Dequantisation uses bitsandbytes' NF4 kernel where it is installed and agrees with ours on the device
and, for each weight shape, on its first weight (`_kernel`; on this project's CPUs about 6x faster than
ours where it is right), else plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox.kernels import nf4
from neox.kernels.bnb import load_bitsandbytes
from neox.model.lora import move_adapter

_FIELDS = {"data": "weight_4bit", "absmax": "weight_absmax", "absmax_q": "weight_absmax_q"}
_FIELDS |= {"absmax_scale": "weight_absmax_scale", "absmax_mean": "weight_absmax_mean"}
_DEVICES: dict[tuple, object] = {}  # device -> bitsandbytes' dequantiser (passed its probe) or None
_SHAPES: dict[tuple, object] = {}  # (device, weight shape) -> the same, checked on that shape's first weight


def _kernel(p: nf4.Packed, shape: tuple) -> object:
    """bitsandbytes' NF4 dequantiser where it gives our values for this device and shape, else None.

    Checked per shape: bitsandbytes 0.50's CPU kernel returns wrong values for some (an [80, 96] weight
    is off by up to 2.4 after a [2, 194] probe agreed), so its word on one shape is not taken for another."""
    device = p.data.device
    where = (device.type, device.index)
    if where not in _DEVICES:
        _DEVICES[where] = nf4.bnb_dequantizer(load_bitsandbytes(), device)
    run = _DEVICES[where]
    key = (*where, shape)
    if key not in _SHAPES:
        ok = run is not None and torch.allclose(
            run(p, shape, torch.float32), nf4.dequantize(p, shape, "nf4", torch.float32)
        )
        _SHAPES[key] = run if ok else None
    return _SHAPES[key]


class _Matmul4bit(torch.autograd.Function):
    """x @ dequant(W).T with nothing but the layer kept for backward (W is frozen: no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad @ ctx.layer.dequantized(grad.dtype)).to(ctx.x_dtype), None


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is kept as 4-bit codes (see the module docstring)."""

    def __init__(self, linear: nn.Linear, kind: str, double_quant: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind, self.weight_dtype = kind, linear.weight.dtype
        self.weight_shape = tuple(linear.weight.shape)
        for field, t in nf4.quantize(linear.weight, kind, double_quant).tensors().items():
            self.register_buffer(_FIELDS[field], t)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def packed(self) -> nf4.Packed:
        return nf4.Packed(**{f: getattr(self, name, None) for f, name in _FIELDS.items()})

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.weight_dtype
        p = self.packed()
        run = _kernel(p, self.weight_shape) if self.kind == "nf4" else None
        if run is not None:
            return run(p, self.weight_shape, dtype)
        return nf4.dequantize(p, self.weight_shape, self.kind, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # the matmul in autocast's dtype, as nn.Linear's would be
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _Matmul4bit.apply(x, self) if torch.is_grad_enabled() else F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_nbytes(self) -> int:
        return nf4.nbytes(self.packed())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.kind}"


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


@torch.no_grad()
def quantize_base_(model: nn.Module, kind: str, double_quant: bool = False, everything: bool = False) -> int:
    """Store the weights of the LoRA-adapted nn.Linear layers of `model` (or, `everything`, of all of them)
    in 4 bits (`kind`: nf4 or fp4), on the device they are on; returns how many were quantized. A weight
    shared with another module (a tied head) stays as it is: its other user reads it in full precision."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    chosen = [
        (path, m)
        for path, m in model.named_modules()
        if type(m) is nn.Linear and (everything or hasattr(m, "lora_A")) and counts[id(m.weight)] == 1
    ]
    for path, m in chosen:
        q = Linear4bit(m, kind, double_quant)
        move_adapter(m, q)
        _replace(model, path, q)
    return len(chosen)


@torch.no_grad()
def dequantize_base_(model: nn.Module) -> int:
    """Every Linear4bit back to an nn.Linear holding its dequantised weight (adapters kept, unmerged)."""
    chosen = [(path, m) for path, m in model.named_modules() if isinstance(m, Linear4bit)]
    for path, m in chosen:
        w = m.dequantized()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        lin.bias = m.bias
        move_adapter(m, lin)
        _replace(model, path, lin)
    return len(chosen)


def is_quantized_key(name: str) -> bool:
    """Whether a state-dict key is one of a Linear4bit's buffers."""
    return name.rsplit(".", 1)[-1] in _FIELDS.values()


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, weights) over the model's Linear4bit layers: the storage of their 4-bit weights."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    return sum(m.weight_nbytes() for m in layers), sum(m.in_features * m.out_features for m in layers)
