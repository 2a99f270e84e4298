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
