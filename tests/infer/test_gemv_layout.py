"""The transposed output-weight layout changes strides only: same values, same tokens, storage restored."""

import pytest
import torch

from neox.infer import gemv_layout
from neox.infer.generate import generate
from tests.infer.tiny import random_model, tiny_config


@pytest.mark.parametrize("untied", [True, False])
def test_layout_is_applied_for_one_long_sequence_and_restored(untied):
    model = random_model(tiny_config(no_weight_tying=untied), scale=0.3)
    weight = gemv_layout.output_weight(model)
    before, ptr = weight.detach().clone(), weight.data_ptr()
    with gemv_layout.transposed_output_weight(model, batch=1, new_tokens=32):
        assert weight.stride() == (1, weight.shape[0]) and torch.equal(weight, before)
    assert weight.data_ptr() == ptr and weight.is_contiguous()
    with gemv_layout.transposed_output_weight(model, batch=2, new_tokens=32):
        assert weight.is_contiguous()  # batched: MKL gains nothing, no copy
    with gemv_layout.transposed_output_weight(model, batch=1, new_tokens=gemv_layout.MIN_NEW_TOKENS - 1):
        assert weight.is_contiguous()  # too short to repay the copy


@pytest.mark.parametrize("untied", [True, False])
def test_tokens_are_those_of_the_plain_layout(untied, monkeypatch):
    model = random_model(tiny_config(no_weight_tying=untied), scale=0.3)
    prompt = [[3, 1, 4, 1, 5]]
    fast = generate(model, prompt, 24).tokens
    monkeypatch.setattr(gemv_layout, "MIN_NEW_TOKENS", 10**9)
    assert generate(model, prompt, 24).tokens == fast
    assert generate(model, prompt, 24, recompute=True).tokens == fast
