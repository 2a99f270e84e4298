"""LoRA adapters on their own, beside each checkpoint of a LoRA run.

The checkpoint's DCP shards already hold the adapters (resuming restores them exactly); these two files are
the small copy a user ships or inspects without the base weights:

- ``adapter_model.safetensors``: every ``*.lora_A`` [r, in] and ``*.lora_B`` [out, r] under neox's parameter
  names (``layers.{i}.attention.query_key_value.lora_A``, ...), full tensors in the training dtype;
- ``adapter_config.json``: rank, alpha, dropout, target modules and the scale alpha / rank, so that
  W' = W + scale * B @ A rebuilds the fine-tuned weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from neox.model.lora import is_adapter_key

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as full CPU tensors by parameter name. Collective under FSDP (every rank must call it,
    in the same order): each sharded adapter is gathered, the base weights are not."""
    out = {}
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().to("cpu", copy=True).contiguous()
    return out


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
    (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
