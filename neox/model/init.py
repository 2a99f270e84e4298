"""GPT-NeoX initialisation (megatron/model/init_functions.py): `init_method` for input-side weights
(embeddings, qkv, MLP input projections, untied output layer, T5 bias table), `output_layer_init_method`
for the projections that write into the residual stream (attention dense, MLP down), zeros for biases,
ones for norm scales.

Two ways to draw the same distributions:
- `init_weights(model, cfg)`: in place from the global torch RNG, parameter by parameter in module order
  (what `GPT.__init__` does; `torch.manual_seed(s); GPT(cfg)` is reproducible in one process).
- `seeded_rows(rule, cfg, name, shape, seed, start, stop)`: rows [start, stop) of a parameter's value as a
  function of (run seed, parameter name, shape) alone. The full value is cut into fixed row blocks of its
  shape, each drawn from a generator seeded by (seed, name, block), so any slice of it comes out the same
  whether the whole tensor is drawn or only the blocks a shard overlaps: the training path
  (neox.train.build) initialises each rank's shard of a meta-built model this way, identically under every
  parallel layout and without ever holding more than one block beyond the shard.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from neox.config.schema import ModelConfig
from neox.model.mup import init_multiplier

InitFn = Callable[[torch.Tensor], torch.Tensor]

# Parameter rules: which of the config's methods (or constant) a parameter takes.
INPUT, OUTPUT, ZEROS, ONES = "input", "output", "zeros", "ones"
# Elements per independently seeded row block of `seeded_rows` (4 MiB of fp32): part of the definition of the
# values, so it must not change with the layout (or at all, for reproducible runs).
BLOCK_ELEMENTS = 1 << 20


def init_std(name: str, cfg: ModelConfig) -> float | None:
    """Standard deviation of the normal-type methods (None for xavier / orthogonal)."""
    sigma, layers, h = cfg.init_method_std, cfg.num_layers, cfg.hidden_size
    return {
        "normal": sigma,
        "scaled_normal": sigma / math.sqrt(2.0 * layers),
        "small_init": math.sqrt(2.0 / (5.0 * h)),  # Nguyen & Salazar, "Transformers without Tears"
        "wang_init": 2.0 / layers / math.sqrt(h),
    }.get(name)


# GPT-NeoX's "orthogonal" ends up with gain sqrt(2 / 1): its n_layers argument receives mup_m_width = 1
ORTHOGONAL_GAIN = math.sqrt(2.0)


def init_fn(name: str, cfg: ModelConfig) -> InitFn:
    std = init_std(name, cfg)
    if std is not None:
        return lambda t: nn.init.normal_(t, mean=0.0, std=std)
    if name == "xavier_uniform":
        return nn.init.xavier_uniform_
    if name == "xavier_normal":
        return nn.init.xavier_normal_
    if name == "orthogonal":
        return lambda t: _orthogonal(t, gain=ORTHOGONAL_GAIN)
    raise ValueError(f"unknown init method {name!r}")


def _orthogonal(t: torch.Tensor, gain: float, generator: torch.Generator | None = None) -> torch.Tensor:
    # QR has no bf16/fp16 kernel: factorise in fp32 and copy (GPT-NeoX patches its orthogonal init likewise)
    if t.dtype == torch.float32 or t.device.type == "meta":
        return nn.init.orthogonal_(t, gain=gain, generator=generator)
    return t.copy_(nn.init.orthogonal_(torch.empty(t.shape, device=t.device), gain=gain, generator=generator))


# Submodule names whose weight is a residual-stream output projection.
OUTPUT_LAYERS = (
    "attention.dense",
    "mlp.dense_4h_to_h",
    "mlp.w2",
    "shared_experts.dense_4h_to_h",
    "shared_experts.w2",
)


def parameter_rules(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, str]]:
    """(name, parameter, rule) for every initialised parameter of a neox.model.GPT (or a pipeline stage of
    it), in module order; rule is INPUT, OUTPUT, ZEROS or ONES."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            yield prefix + "weight", module.weight, OUTPUT if name.endswith(OUTPUT_LAYERS) else INPUT
            if module.bias is not None:
                yield prefix + "bias", module.bias, ZEROS
            if hasattr(module, "lora_A"):  # LoRA (neox.model.lora): A drawn as an input weight, B zeros
                yield prefix + "lora_A", module.lora_A, INPUT
                yield prefix + "lora_B", module.lora_B, ZEROS
        elif isinstance(module, nn.Embedding):
            yield prefix + "weight", module.weight, INPUT
        elif hasattr(module, "init_rules"):  # modules holding raw parameters (MoE experts) name their rules
            for pname, rule in module.init_rules():
                yield prefix + pname, getattr(module, pname), rule
        elif name.endswith("layernorm") or name.endswith("final_layer_norm"):
            for pname, p in module.named_parameters(recurse=False):
                yield prefix + pname, p, ONES if pname == "weight" else ZEROS


def method_of(rule: str, cfg: ModelConfig) -> str:
    return cfg.output_layer_init_method if rule == OUTPUT else cfg.init_method


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """(Re)initialise every parameter of a neox.model.GPT in place, from the global torch RNG."""
    fns = {INPUT: init_fn(cfg.init_method, cfg), OUTPUT: init_fn(cfg.output_layer_init_method, cfg)}
    for name, p, rule in parameter_rules(model):
        if rule in fns:
            fns[rule](p)
            scale = init_multiplier(cfg, name, tuple(p.shape))
            if scale != 1.0:
                p.mul_(scale)
        else:
            p.fill_(1.0 if rule == ONES else 0.0)


def block_seed(seed: int, name: str, block: int) -> int:
    """A generator seed for one row block of one parameter: a stable hash (not Python's salted `hash`)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rows_per_block(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:])
    return max(1, BLOCK_ELEMENTS // max(1, row))


def seeded_rows(
    rule: str, cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Rows [start, stop) (dim 0) of parameter `name`'s initial value (fp32, CPU), a function of
    (seed, name, shape) only; see the module docstring. Orthogonal matrices are drawn whole (QR needs them)."""
    shape = tuple(shape)
    stop = shape[0] if stop is None else stop
    local = (stop - start, *shape[1:])
    if rule in (ZEROS, ONES):
        return torch.full(local, 1.0 if rule == ONES else 0.0)
    method = method_of(rule, cfg)
    scale = init_multiplier(cfg, name, shape)
    if method == "orthogonal":
        g = torch.Generator().manual_seed(block_seed(seed, name, -1))
        return _orthogonal(torch.empty(shape), ORTHOGONAL_GAIN, generator=g)[start:stop] * scale
    std = init_std(method, cfg)
    if std is None:  # xavier: the fans of the whole matrix, elementwise draws
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
        std = math.sqrt(2.0 / float(fan_in + fan_out))
    uniform = method == "xavier_uniform"
    bound = math.sqrt(3.0) * std  # a uniform on [-a, a] has std a / sqrt(3)
    step = rows_per_block(shape)
    out = torch.empty(local)
    for block in range(start // step, -(-stop // step) if stop > start else start // step):
        b0, b1 = block * step, min(shape[0], (block + 1) * step)
        g = torch.Generator().manual_seed(block_seed(seed, name, block))
        values = torch.empty((b1 - b0, *shape[1:]))
        values.uniform_(-bound, bound, generator=g) if uniform else values.normal_(0.0, std, generator=g)
        lo, hi = max(b0, start), min(b1, stop)
        out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out.mul_(scale) if scale != 1.0 else out
