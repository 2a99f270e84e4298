"""oneDNN-packed linears: the same products as F.linear, the same greedy tokens, copies reused until a weight
changes, every layer's own forward back after the block."""

import pytest
import torch

from neox.infer import packed
from neox.infer.generate import generate
from tests.infer.tiny import greedy_reference, random_model, tiny_config

pytestmark = pytest.mark.skipif(not packed.onednn_available(), reason="this torch has no oneDNN (mkldnn) build")


def _model(dtype):
    return random_model(tiny_config(no_weight_tying=True), scale=0.3).to(dtype)


@pytest.mark.parametrize(("dtype", "batch"), [(torch.bfloat16, 1), (torch.bfloat16, 3), (torch.float32, 3)])
def test_products_equal_plain_linear_and_forwards_are_restored(dtype, batch):
    model = _model(dtype)
    if dtype == torch.bfloat16 and packed.cpu_lacks_bf16():
        pytest.skip("no bf16 arithmetic on this CPU: bf16 layers are not packed")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(batch, 5, 64).to(dtype)
    plain = linears[0](x)  # the first attention's fused projection, hidden -> qkv
    with packed.packed_linears(model, batch) as n:
        assert n == len(linears)
        assert all("forward" in m.__dict__ for m in linears)
        fast = linears[0](x)
    assert not any("forward" in m.__dict__ for m in linears)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(fast.float(), plain.float(), atol=tol, rtol=tol)


def test_fp32_single_row_is_left_to_mkl():
    with packed.packed_linears(_model(torch.float32), 1) as n:
        assert n == 0


def test_copies_are_reused_and_rebuilt_after_a_weight_changes():
    model = _model(torch.float32)
    with packed.packed_linears(model, 2):
        first = dict(packed._packed[model][1])
    with packed.packed_linears(model, 2):
        assert all(packed._packed[model][1][m] is w for m, w in first.items())
    with torch.no_grad():
        model.embed_out.weight.mul_(2.0)
    with packed.packed_linears(model, 2):
        assert packed._packed[model][1][model.embed_out] is not first[model.embed_out]
    packed.release(model)
    assert model not in packed._packed


def test_nothing_is_packed_when_the_copies_would_not_fit(monkeypatch):
    model = _model(torch.float32)
    monkeypatch.setattr(packed, "_available_bytes", lambda: 1000)
    with packed.packed_linears(model, 2) as n:
        assert n == 0


def test_batched_greedy_tokens_equal_the_plain_loop():
    model = _model(torch.float32)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]
    got = generate(model, prompts, 12).tokens
    assert got == [greedy_reference(model, p, 12) for p in prompts]
