"""neox: train, evaluate and export GPT-style language models with PyTorch's own distributed engine."""

__version__ = "0.1.0"


def load(checkpoint, device="cpu", dtype=None):
    """Load a checkpoint (a run directory or one checkpoint in it) -> (model, tokenizer). See neox.infer.api."""
    from neox.infer.api import load as _load

    return _load(checkpoint, device=device, dtype=dtype)
