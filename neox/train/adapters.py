"""LoRA adapters on their own, beside each checkpoint of a LoRA run.

The checkpoint's DCP shards already hold the adapters (resuming restores them exactly); these two files are
the small copy a user ships or inspects without the base weights:

- ``adapter_model.safetensors``: every ``*.lora_A`` [r, in] and ``*.lora_B`` [out, r] under neox's parameter
  names (``layers.{i}.attention.query_key_value.lora_A``, ...), full tensors in the training dtype;
- ``adapter_config.json``: rank, alpha, dropout, target modules and the scale alpha / rank, so that
  W' = W + scale * B @ A rebuilds the fine-tuned weight (a QLoRA run's also names its 4-bit code: W is then
  the dequantised base weight, which the run's own checkpoint holds).

QLoRA (`lora.quantize`): `quantize_base` turns the base into 4-bit layers once its values are final: after
a full-precision checkpoint loads into it, or, for a checkpoint that holds 4-bit codes already
(`stores_4bit`), before, so that the codes load as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from neox.errors import ConfigError
from neox.model.lora import is_adapter_key
from neox.model.qlora import is_quantized_key, quantize_base_
from neox.parallel.pipeline import gather_stages
from neox.train.checkpoint import tensor_entries

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_tensors(model: nn.Module, mesh=None) -> dict[str, torch.Tensor]:
    """The adapters as full CPU tensors by parameter name. Collective under FSDP, tensor and pipeline
    parallelism (every rank must call it, in the same order): each sharded adapter is gathered, the base
    weights are not; under pipeline stages (`mesh`'s "pp" dim) every stage's adapters are gathered too."""
    out = {}
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().to("cpu", copy=True).contiguous()
    return gather_stages(out, mesh)


def write_adapter_files(directory: Path, tensors: dict[str, torch.Tensor], lora_cfg) -> None:
    save_file(tensors, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "format": "neox-lora",
        "rank": lora_cfg.rank,
        "alpha": lora_cfg.alpha,
        "scale": lora_cfg.alpha / lora_cfg.rank,
        "dropout": lora_cfg.dropout,
        "target_modules": list(lora_cfg.target_modules),
    }
    if lora_cfg.quantize != "none":
        config.update(quantize=lora_cfg.quantize, double_quant=lora_cfg.double_quant)
    (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def quantize_base(model: nn.Module, lora_cfg, world_size: int) -> int:
    """QLoRA: the base weights of `model` to 4 bits (neox.model.qlora; a no-op when lora.quantize is none or
    they are 4-bit already); returns how many layers it quantized."""
    if lora_cfg.quantize == "none":
        return 0
    if world_size > 1:
        raise ConfigError(
            f"lora.quantize: 4-bit base weights (QLoRA) run on one process only for now, not {world_size}; "
            "launch one process or set lora.quantize: none"
        )
    return quantize_base_(model, lora_cfg.quantize, lora_cfg.double_quant, lora_cfg.quantize_all)


def stores_4bit(checkpoint_dir: str | Path) -> bool:
    """Whether a checkpoint holds 4-bit base weights (a QLoRA run's) rather than full-precision ones."""
    return any(is_quantized_key(k) for k in tensor_entries(checkpoint_dir))
