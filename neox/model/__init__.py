"""The GPT model (plain PyTorch). Exports are loaded on first use so that `neox.model.info` (shape and
parameter arithmetic, used by `neox info`) stays importable without torch."""

_EXPORTS = {
    "GPT": "neox.model.transformer",
    "Block": "neox.model.transformer",
    "KVCache": "neox.model.cache",
    "init_weights": "neox.model.init",
    "flops_per_token": "neox.model.info",
    "num_params": "neox.model.info",
    "memory_per_rank": "neox.model.info",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neox.model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
