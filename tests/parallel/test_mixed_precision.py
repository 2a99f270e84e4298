"""FSDP2's dtypes per precision and GPT-NeoX's fp32_allreduce (default false: reduce in the training precision)."""

import pytest
import torch

from neox.config import from_dict
from neox.parallel.fsdp import mixed_precision

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    "precision, bf16_mode, fp32_allreduce, param_dtype, reduce_dtype",
    [
        # param_dtype None: the fp32 masters are gathered (autocast casts per op); reduce_dtype None: the
        # gradients' own dtype (param_dtype when set, else the masters')
        ("bf16", "autocast", False, BF16, None),
        ("bf16", "autocast", True, BF16, FP32),
        ("fp16", "autocast", False, None, FP16),
        ("fp16", "autocast", True, None, FP32),
        ("bf16", "pure", False, None, None),  # bf16 weights: bf16 gradients, reduced as they are
        ("bf16", "pure", True, None, FP32),
        ("fp32", "autocast", False, None, None),
        ("fp32", "autocast", True, None, FP32),
    ],
)
def test_reduce_dtype(precision, bf16_mode, fp32_allreduce, param_dtype, reduce_dtype):
    policy = mixed_precision(precision, bf16_mode, fp32_allreduce)
    assert (policy.param_dtype, policy.reduce_dtype) == (param_dtype, reduce_dtype)


def test_fp32_allreduce_is_gpt_neox_key_defaulting_off():
    assert from_dict({}).precision.fp32_allreduce is False
    assert from_dict({"fp32_allreduce": True}).precision.fp32_allreduce is True
