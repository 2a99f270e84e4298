"""neox.parallel's gradient norm and clipping on one process against norms worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from neox.parallel import clip_grad_norm_, grad_norm
from tests.syncs import count_syncs


def params_with_grads(*grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        out.append(p)
    return out


def grads_of(params):
    return [p.grad.tolist() for p in params]


# gradients [3, 4] and [-12] (and one parameter without a gradient, which is skipped):
#   2-norm  sqrt(9 + 16 + 144) = 13;  inf-norm  max |g| = 12
@pytest.mark.parametrize("norm_type, norm", [(2.0, 13.0), (math.inf, 12.0)])
def test_norm_of_all_gradients(norm_type, norm):
    params = params_with_grads([3.0, 4.0], [-12.0]) + [torch.nn.Parameter(torch.ones(2))]
    assert float(grad_norm(params, norm_type=norm_type)) == pytest.approx(norm, rel=1e-7)


@pytest.mark.parametrize("norm_type, norm", [(2.0, 13.0), (math.inf, 12.0)])
def test_clipping_scales_every_gradient_by_max_norm_over_norm(norm_type, norm):
    params = params_with_grads([3.0, 4.0], [-12.0])
    max_norm = norm / 4  # coefficient max_norm / (norm + 1e-6), torch's own epsilon
    returned = clip_grad_norm_(params, max_norm, norm_type=norm_type)
    assert float(returned) == pytest.approx(norm, rel=1e-7)  # the norm before clipping
    coef = max_norm / (norm + 1e-6)
    got = grads_of(params)
    assert got[0] == pytest.approx([3.0 * coef, 4.0 * coef], rel=1e-6)
    assert got[1] == pytest.approx([-12.0 * coef], rel=1e-6)
    assert float(grad_norm(params, norm_type=norm_type)) == pytest.approx(max_norm, rel=1e-6)


@pytest.mark.parametrize("max_norm", [13.5, 0.0])
def test_no_clipping_below_the_limit_or_when_off(max_norm):
    """A norm under max_norm leaves the gradients as they are; max_norm 0 only measures."""
    params = params_with_grads([3.0, 4.0], [-12.0])
    assert float(clip_grad_norm_(params, max_norm)) == pytest.approx(13.0)
    assert grads_of(params) == [[3.0, 4.0], [-12.0]]


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_matches_torch_clip_grad_norm_on_random_gradients(norm_type):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    flat = torch.cat([p.grad.flatten() for p in ours])
    by_hand = flat.abs().max() if math.isinf(norm_type) else flat.square().sum().sqrt()
    n_ours = clip_grad_norm_(ours, 0.5, norm_type=norm_type)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type=norm_type)
    assert float(n_ours) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(n_ours) == pytest.approx(float(n_theirs), rel=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_clipping_reads_nothing_back_from_the_device():
    """Norm and coefficient stay tensors (one foreach multiply, always applied, as torch does): no host sync."""
    params = params_with_grads([3.0, 4.0], [-12.0])
    with count_syncs() as reads:
        norm = clip_grad_norm_(params, 6.5)
    assert reads == [] and isinstance(norm, torch.Tensor) and norm.shape == ()
    coef = 6.5 / (13.0 + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
    assert [g for row in grads_of(params) for g in row] == pytest.approx([3 * coef, 4 * coef, -12 * coef], rel=1e-6)
