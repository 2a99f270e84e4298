"""The output projection's weight kept transposed in memory while decoding one sequence on CPU in fp32.

Decoding a single sequence multiplies one row by the [vocab, hidden] output weight, the largest matrix of a
small model. MKL reads that weight faster when it is stored hidden-major (the transpose made contiguous and
viewed back: same shape, same values, other strides; figures in docs/benchmarks.md, "Kernel measurements").
The copy costs
one pass over the weight per generation, so it is made only when enough tokens follow to repay it.
"""

from __future__ import annotations

import contextlib

import torch

from neox.infer.tensor_parallel import is_dtensor

MIN_NEW_TOKENS = 16  # below this the one-off copy of the weight outweighs the per-token saving


def output_weight(model) -> torch.nn.Parameter | None:
    if getattr(model, "embed_out", None) is not None:
        return model.embed_out.weight
    if getattr(model, "tied", False) and getattr(model, "embed_in", None) is not None:
        return model.embed_in.weight
    return None


@contextlib.contextmanager
def transposed_output_weight(model, batch: int, new_tokens: int):
    """Within the block the output weight is stored transposed (values and shape unchanged) when that pays:
    CPU, fp32, a batch of one, at least MIN_NEW_TOKENS tokens. The original storage is put back after."""
    weight = output_weight(model)
    if (
        weight is None
        or is_dtensor(weight)  # a tensor-parallel shard: its local storage is not ours to swap
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or batch != 1
        or new_tokens < MIN_NEW_TOKENS
        or not weight.is_contiguous()
    ):
        yield
        return
    original = weight.data
    with torch.inference_mode(False):  # a normal tensor: a parameter's data must not be an inference tensor
        weight.data = original.t().contiguous().t()
    try:
        yield
    finally:
        weight.data = original
