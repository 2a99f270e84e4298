"""The chunked masked-mean cross entropy matches F.cross_entropy in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from neox.train import loss as L


def reference(logits, labels, mask):
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    keep = mask.flatten() * (labels.flatten() >= 0)
    return (per_token * keep).sum() / keep.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_cross_entropy_with_masks_and_ignored_labels(monkeypatch, dtype):
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 3 * 50)  # several chunks, the last one short
    torch.manual_seed(0)
    w = torch.randn(50, 16, requires_grad=True)
    h = torch.randn(2, 7, 16)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 2] = -100
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = L.masked_mean_loss(F.linear(h, w), labels, mask)
    ours.backward()
    g_ours, w.grad = w.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ref = reference(F.linear(h, w), labels, mask)
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(g_ours, w.grad, **tol)


def test_all_masked_is_zero_not_nan():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    out = L.masked_mean_loss(logits * 1.0, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    out.backward()
    assert out.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_chunk_size_is_cache_sized_on_cpu_and_large_on_accelerators():
    v = 50304  # Pythia's padded vocabulary
    cpu = L.chunk_rows(v, torch.device("cpu"))
    assert cpu == (1 << 22) // v == 83  # 4M fp32 logits: 16 MB, a last-level cache
    for name in ("cuda", "cuda:1"):  # torch.device needs no GPU to exist
        rows = L.chunk_rows(v, torch.device(name))
        assert rows == (1 << 28) // v == 5336  # 1 GiB fp32 temporaries: 8 x 2048 tokens in 4 chunks, not 198
    assert L.chunk_rows(1 << 30, torch.device("cpu")) == 1  # a vocabulary larger than a chunk: one row at a time


@pytest.mark.parametrize("rows", [1, 3, 5, 14, 100])  # one row per chunk, uneven last chunk, exact, one chunk
def test_loss_and_gradient_do_not_depend_on_chunking(monkeypatch, rows):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 7))
    labels[1, 0] = -100
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0

    def run():
        x = logits.clone().requires_grad_()
        loss = L.masked_mean_loss(x * 1.0, labels, mask)
        loss.backward()
        return loss.detach(), x.grad

    monkeypatch.setattr(L, "chunk_rows", lambda v, device: rows)
    loss, grad = run()
    # against F.cross_entropy in float64: the chunks' order of work cannot show in the result
    ref_x = logits.clone().requires_grad_()
    per_token = F.cross_entropy(ref_x.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    keep = mask.flatten().double() * (labels.flatten() >= 0)
    ((per_token * keep).sum() / keep.sum()).backward()
    ref = (per_token * keep).sum() / keep.sum()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_x.grad, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(L, "chunk_rows", lambda v, device: 14)  # every row in one chunk
    one_loss, one_grad = run()
    assert torch.equal(loss, one_loss) and torch.equal(grad, one_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor", [1.0, 0.25, 3.0])
def test_scaled_backward_matches_cross_entropy(monkeypatch, dtype, factor):
    # the gradient is made in the forward pass (fp32, bf16) or the backward (fp16, where the unscaled
    # gradient could underflow): a loss scaled before backward (accumulation, fp16 loss scaling) scales it
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 4 * 40)
    torch.manual_seed(1)
    base = torch.randn(3, 5, 40).to(dtype)
    labels = torch.randint(0, 40, (3, 5))
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    ours_x = base.clone().requires_grad_()
    ours = L.masked_mean_loss(ours_x * 1, labels, mask)
    (ours * factor).backward()
    ref_x = base.clone().requires_grad_()
    ref = reference(ref_x, labels, mask)
    (ref * factor).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(ours_x.grad.float(), ref_x.grad.float(), **tol)


def test_no_gradient_leaves_the_logits_alone():
    logits = torch.randn(2, 4, 30)
    before = logits.clone()
    with torch.no_grad():
        out = L.masked_mean_loss(logits, torch.randint(0, 30, (2, 4)), torch.ones(2, 4))
    assert torch.equal(logits, before) and torch.isfinite(out)


def test_logits_saved_by_another_op_fail_loudly():
    # the forward pass writes the gradient into the logits: an op that kept them for its own backward
    # must raise, not read the gradient as if it were the logits
    x = torch.randn(2, 3, 10, requires_grad=True)
    logits = torch.tanh(x)  # tanh keeps its output for the backward pass
    loss = L.masked_mean_loss(logits, torch.randint(0, 10, (2, 3)), torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_huge_loss_does_not_underflow():
    # the label's probability underflows fp32 (loss ~ 200): the log-sum-exp is taken from the largest
    # probability, which cannot
    logits = torch.zeros(1, 2, 8)
    logits[0, :, 0] = 200.0
    labels = torch.tensor([[3, 5]])
    x = logits.clone().requires_grad_()
    out = L.masked_mean_loss(x * 1, labels, torch.ones(1, 2))
    out.backward()
    torch.testing.assert_close(out, reference(logits, labels, torch.ones(1, 2)))
    assert torch.isfinite(x.grad).all()


def _head_and_loss(fn, dtype, factor, pure=False):
    """fn(x, weight, labels, mask) under bf16 autocast (or on bf16 tensors with pure), scaled by `factor`;
    returns the loss and the gradients of x and the weight."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.randn(40, 16, generator=g)
    if pure:
        x, w = x.to(dtype), w.to(dtype)
    x.requires_grad_(), w.requires_grad_()
    labels = torch.randint(0, 40, (3, 5), generator=g)
    labels[0, 1] = -100
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32 and not pure):
        loss = fn(x, w, labels, mask)
    (loss * factor).backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype, pure", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("factor", [1.0, 0.25])
def test_output_layer_and_loss_in_one_node_equal_the_separate_layers(monkeypatch, dtype, pure, factor):
    # the same products as F.linear followed by masked_mean_loss: bitwise equal where the factor is a power of 2
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 4 * 40)
    ours = _head_and_loss(L.linear_masked_mean_loss, dtype, factor, pure)
    separate = _head_and_loss(lambda x, w, y, m: L.masked_mean_loss(F.linear(x, w), y, m), dtype, factor, pure)
    for a, b in zip(ours, separate):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert L.masked_mean_loss.with_head is L.linear_masked_mean_loss


def test_output_layer_and_loss_in_fp16_keep_the_separate_layers():
    ours = _head_and_loss(L.linear_masked_mean_loss, torch.float16, 1024.0, pure=True)
    separate = _head_and_loss(
        lambda x, w, y, m: L.masked_mean_loss(F.linear(x, w), y, m), torch.float16, 1024.0, pure=True
    )
    for a, b in zip(ours, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_output_layer_and_loss_without_gradients_keep_nothing():
    x, w = torch.randn(2, 3, 8), torch.randn(10, 8)
    labels, mask = torch.randint(0, 10, (2, 3)), torch.ones(2, 3)
    with torch.no_grad():
        loss = L.linear_masked_mean_loss(x, w, labels, mask)
    torch.testing.assert_close(loss, reference(F.linear(x, w), labels, mask))


def test_a_cpu_without_bf16_arithmetic_keeps_the_separate_layers(monkeypatch):
    # there F.linear is routed to the fp32-block matmul (neox.kernels.bf16_cpu); a plain mm would be emulated
    monkeypatch.setattr(L, "cpu_lacks_bf16", lambda: True)
    seen = []
    monkeypatch.setattr(L._LinearMaskedMeanCrossEntropy, "apply", lambda *a: seen.append(a))
    _head_and_loss(L.linear_masked_mean_loss, torch.bfloat16, 1.0)
    assert seen == []
