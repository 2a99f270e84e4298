"""Mixture of experts: routing and aux losses against the formulas on hand-worked numbers, Sinkhorn against an
independent numpy implementation, dispatch against a per-token loop, capacity dropping by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neox.config import from_dict
from neox.errors import ConfigError
from neox.model import GPT
from neox.model import moe as M
from neox.parallel.mesh import ParallelDims

BASE = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8, "vocab_size": 64}


def moe_cfg(**kw):
    return from_dict({**BASE, "moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk", **kw}).model


# ---------------------------------------------------------------- routing formulas


def test_topk_route_hand_worked():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    weights, experts, probs = M.route(logits, 2, "topk", training=True)
    p0 = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    p1 = np.exp([0.0, 1.0, 3.0]) / np.exp([0.0, 1.0, 3.0]).sum()
    assert experts.tolist() == [[0, 1], [2, 1]]
    np.testing.assert_allclose(weights.numpy(), [[p0[0], p0[1]], [p1[2], p1[1]]], rtol=1e-6)
    np.testing.assert_allclose(probs.numpy(), [p0, p1], rtol=1e-6)
    renorm, _, _ = M.route(logits, 2, "topk", training=True, renormalize=True)
    np.testing.assert_allclose(renorm.numpy()[0], [p0[0] / (p0[0] + p0[1]), p0[1] / (p0[0] + p0[1])], rtol=1e-6)


def test_load_balancing_loss_hand_worked():
    # 2 tokens, both to expert 0: f = [1, 0], P = [0.625, 0.375] -> 2 * (1 * 0.625 + 0) = 1.25
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert M.load_balancing_loss(probs, torch.tensor([[0], [0]]), 2).item() == pytest.approx(1.25)
    # uniform routing and probabilities give exactly 1 (top-2 of 4: every expert gets a quarter)
    uniform = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert M.load_balancing_loss(uniform, experts, 4).item() == pytest.approx(1.0)


def test_router_z_loss_hand_worked():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert M.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def numpy_sinkhorn(cost: np.ndarray, iters: int = 5000) -> np.ndarray:
    """Independent Sinkhorn-Knopp: alternately rescale rows to 1/N and columns to 1/E."""
    p = np.exp(cost - cost.max()).astype(np.float64)
    n, e = p.shape
    for _ in range(iters):
        p = p / p.sum(1, keepdims=True) / n
        p = p / p.sum(0, keepdims=True) / e
    return p


def test_sinkhorn_matches_independent_implementation():
    g = torch.Generator().manual_seed(0)
    cost = torch.randn(12, 4, generator=g) * 2
    ours = M.sinkhorn(cost).double().numpy()
    ref = numpy_sinkhorn(cost.double().numpy())
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(ours.sum(0), np.full(4, 1 / 4), rtol=2e-3)
    np.testing.assert_allclose(ours.sum(1), np.full(12, 1 / 12), rtol=1e-5)
    assert (np.argsort(-ours, 1)[:, :2] == np.argsort(-ref, 1)[:, :2]).all()


def test_sinkhorn_route_balances_while_training_and_is_topk_at_eval():
    # every token prefers expert 0; the balanced assignment spreads them, the weights stay the softmax's
    logits = torch.tensor([[3.0, 0.0], [3.0, 1.0], [3.0, 2.5], [3.0, 0.5]])
    w, experts, probs = M.route(logits, 1, "sinkhorn", training=True)
    ref = numpy_sinkhorn(logits.double().numpy())
    assert experts[:, 0].tolist() == ref.argmax(1).tolist()
    assert set(experts[:, 0].tolist()) == {0, 1}
    np.testing.assert_allclose(w.numpy()[:, 0], torch.sigmoid(logits).gather(1, experts).numpy()[:, 0], rtol=1e-6)
    w_eval, experts_eval, _ = M.route(logits, 1, "sinkhorn", training=False)
    assert experts_eval[:, 0].tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(w_eval.numpy()[:, 0], torch.sigmoid(logits[:, 0]).numpy(), rtol=1e-6)
    w2, e2, _ = M.route(logits, 2, "sinkhorn", training=True)
    np.testing.assert_allclose(w2.numpy(), probs.gather(1, e2).numpy(), rtol=1e-6)


# ---------------------------------------------------------------- capacity


def test_capacity_rule():
    assert M.capacity(10, 2, 4, 1.0, 4) == 5  # ceil(1.0 * 10 * 2 / 4)
    assert M.capacity(10, 1, 4, 1.25, 1) == 4  # ceil(3.125)
    assert M.capacity(4, 1, 4, 1.0, 4) == 4  # the minimum


def test_capacity_drops_first_choices_first_then_token_order():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    # queues at capacity 2 -- expert 0: t0.1st t1.1st | t2.1st t3.2nd ; expert 1: t3.1st t0.2nd | t2.2nd ;
    # expert 2: t1.2nd
    keep = M.assignments_kept(experts, 3, 2)
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert M.assignments_kept(experts, 3, 8).all()


# ---------------------------------------------------------------- dispatch


def reference_moe(experts_mod: M.Experts, x, weights, experts, keep, gated: bool):
    """Per token, per choice: weight * expert(x) with the expert's own matrices (plain loops)."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if keep is not None and not keep[n, j]:
                continue
            e = int(experts[n, j])
            if gated:
                h = F.silu(experts_mod.w1[e] @ x[n]) * (experts_mod.w3[e] @ x[n])
                y = experts_mod.w2[e] @ h
            else:
                y = experts_mod.dense_4h_to_h[e] @ F.gelu(experts_mod.dense_h_to_4h[e] @ x[n])
            out[n] += weights[n, j] * y
    return out


@pytest.mark.parametrize("how", ["grouped_mm", "padded"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dropping", [False, True])
def test_dispatch_equals_per_token_loop(how, activation, dropping):
    cfg = moe_cfg(activation=activation, intermediate_size=24)
    g = torch.Generator().manual_seed(1)
    mod = M.Experts(cfg, 4)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    n = 13
    x = torch.randn(n, 16, generator=g)
    logits = torch.randn(n, 4, generator=g)
    logits[:, 0] += 2  # a crowded expert 0, so capacity really drops
    weights, experts, _ = M.route(logits, 2, "topk", training=True)
    cap = M.capacity(n, 2, 4, 0.5, 2)
    keep = M.assignments_kept(experts, 4, cap) if dropping else None
    if dropping:
        assert not keep.all()
    with torch.no_grad():
        got = M.dispatch(mod, x, weights, experts, keep, how, cap)
        ref = reference_moe(mod, x, weights, experts, keep, gated=activation == "swiglu")
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_per_expert_fallback_equals_grouped_mm(monkeypatch):
    """Devices and dtypes grouped_mm does not take (CUDA fp32) run one matmul per expert: same numbers."""
    cfg = moe_cfg(activation="swiglu", intermediate_size=24)
    mod = M.Experts(cfg, 4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 16, generator=g)
    counts = torch.tensor([3, 0, 6, 2])
    with torch.no_grad():
        grouped = mod.grouped(x, counts)
        monkeypatch.setattr(M, "grouped_mm_supported", lambda x: False)
        torch.testing.assert_close(mod.grouped(x, counts), grouped, atol=1e-6, rtol=1e-6)


def test_cpu_groups_are_padded_to_repeating_shapes(monkeypatch):
    """On a CPU each expert's rows go to the grouped matmul padded to CPU_ROW_ALIGN (oneDNN builds a kernel per
    shape): row counts and group ends are multiples of it, whatever the loads, and the result is unchanged."""
    cfg = moe_cfg(activation="swiglu", intermediate_size=24)
    mod = M.Experts(cfg, 4)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(23, 16, generator=g)
    counts = torch.tensor([9, 0, 13, 1])
    seen, grouped_mm = [], F.grouped_mm

    def recording(a, b, offs):
        seen.append((a.shape[0], offs.tolist()))
        return grouped_mm(a, b, offs=offs)

    monkeypatch.setattr(M.F, "grouped_mm", recording)
    with torch.no_grad():
        aligned = mod.grouped(x, counts)
        monkeypatch.setattr(M, "grouped_mm_supported", lambda x: False)
        per_expert = mod.grouped(x, counts)
    torch.testing.assert_close(aligned, per_expert, atol=1e-6, rtol=1e-6)
    align = M.CPU_ROW_ALIGN
    assert len(seen) == 3  # w1, w3, w2
    for rows, ends in seen:
        assert rows % align == 0 and all(end % align == 0 for end in ends) and ends[-1] == rows
        assert rows < 23 + 5 * align  # at most align - 1 zero rows per expert, and the rounding


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dispatch_on_cuda_equals_per_token_loop(dtype):
    cfg = moe_cfg(activation="swiglu", intermediate_size=64)
    mod = M.Experts(cfg, 4).cuda()
    x = torch.randn(33, 16, device="cuda")
    weights, experts, _ = M.route(torch.randn(33, 4, device="cuda"), 2, "topk", training=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        got = M.dispatch(mod, x, weights, experts, None, "grouped_mm", 0)
    ref = reference_moe(mod.cpu(), x.cpu(), weights.cpu(), experts.cpu(), None, gated=True)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.cpu(), ref, atol=tol, rtol=tol)


def test_dispatch_gradients_match_loop():
    cfg = moe_cfg(activation="swiglu", intermediate_size=24)
    mod = M.Experts(cfg, 4)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(9, 16, generator=g, requires_grad=True)
    weights, experts, _ = M.route(torch.randn(9, 4, generator=g), 2, "topk", training=True)
    upstream = torch.randn(9, 16, generator=g)
    grads = []
    for run in (
        lambda: M.dispatch(mod, x, weights, experts, None, "grouped_mm", 0),
        lambda: reference_moe(mod, x, weights, experts, None, True),
    ):
        mod.zero_grad()
        x.grad = None
        (run() * upstream).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in mod.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the layer


def test_aux_losses_train_the_router_as_explicit_terms():
    """The backward-only attachment gives the gradients of out + scale * (a * lbl + b * z) written out."""
    cfg = moe_cfg(activation="swiglu", intermediate_size=24, moe_aux_loss_coeff=0.3, moe_z_loss_coeff=0.05)
    torch.manual_seed(3)
    layer = M.MoE(cfg).train()
    layer.aux_grad_scale = 0.5
    x = torch.randn(2, 5, 16)
    upstream = torch.randn(2, 5, 16)
    (layer(x) * upstream).sum().backward()
    ours = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    flat = x.reshape(-1, 16)
    logits = layer.router(flat)
    weights, experts, probs = M.route(logits, 2, "topk", training=True)
    out = M.dispatch(layer.experts, flat, weights, experts, None, "grouped_mm", 0).reshape(2, 5, 16)
    aux = 0.3 * M.load_balancing_loss(probs, experts, 4) + 0.05 * M.router_z_loss(logits)
    ((out * upstream).sum() + 0.5 * aux).backward()
    for a, (name, p) in zip(ours, layer.named_parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-6, msg=name)
    assert layer.router.weight.grad.abs().sum() > 0


def test_layer_stats_and_reset():
    cfg = moe_cfg(moe_token_dropping=True, moe_train_capacity_factor=0.5, moe_min_capacity=1)
    torch.manual_seed(4)
    model = GPT(cfg).train()
    model(torch.randint(0, 64, (2, 8)))
    stats = M.read_stats(model)
    assert sum(stats["moe/tokens_per_expert"]) == 2 * (2 * 8 * 2)  # two MoE layers, 16 tokens, top-2
    assert 0 < stats["moe/dropped_frac"] < 1  # capacity 4 of 8 per expert on average: half at most fit
    assert 0 < stats["moe/router_entropy"] <= math.log(4) + 1e-6
    assert stats["moe/aux_loss"] >= 1.0 - 1e-6  # E * sum f P is minimised (1) by uniform routing
    assert M.read_stats(model) is None
    model.eval()
    model(torch.randint(0, 64, (2, 8)))
    assert M.read_stats(model) is None  # evaluation forwards are not counted


def test_expert_interval_and_shared_experts():
    cfg = moe_cfg(
        num_layers=4, moe_expert_interval=2, moe_num_shared_experts=2, activation="swiglu", intermediate_size=8
    )
    model = GPT(cfg)
    kinds = [type(model.layers[str(i)].mlp).__name__ for i in range(4)]
    assert kinds == ["MoE", "MLP", "MoE", "MLP"]
    layer = model.layers["0"].mlp
    assert layer.shared_experts.w1.weight.shape == (16, 16)  # 2 shared experts of width 8
    assert layer.experts.w1.shape == (4, 8, 16) and layer.experts.w2.shape == (4, 16, 8)
    layer.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        weights, experts, _ = M.route(layer.router(x), 2, "topk", training=False)
        routed = reference_moe(layer.experts, x, weights, experts, None, gated=True)
        torch.testing.assert_close(layer(x), routed + layer.shared_experts(x), atol=1e-6, rtol=1e-6)


def test_jitter_only_while_training():
    cfg = moe_cfg(moe_jitter_eps=0.5)
    layer = M.MoE(cfg)
    x = torch.randn(6, 16)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(0)
        a = layer(x)
        torch.manual_seed(1)
        b = layer(x)
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- config


def test_moe_config_errors_and_gpt_neox_keys():
    with pytest.raises(ConfigError, match="moe_top_k"):
        from_dict({**BASE, "moe_num_experts": 2, "moe_top_k": 3})
    with pytest.raises(ConfigError, match="moe_type"):
        from_dict({**BASE, "moe_num_experts": 2, "moe_type": "deepspeed"})
    with pytest.raises(ConfigError, match="moe_expert_parallel_size.*does not divide moe_num_experts 2"):
        from_dict({**BASE, "moe_num_experts": 2, "moe_expert_parallel_size": 3})
    cfg = from_dict({**BASE, "moe_num_experts": 4, "moe_expert_parallel_size": 2})
    assert cfg.parallel.expert_parallel_size == 2
    with pytest.raises(ConfigError, match="expert_parallel_size=2 must divide the data-parallel size 3"):
        ParallelDims.from_config(cfg.parallel, 3, cfg.model)
    assert ParallelDims.from_config(cfg.parallel, 4, cfg.model).ep == 2  # ep2 x dp2: tests/parallel/test_moe_parallel
    with pytest.raises(ConfigError, match="moe_glu"):
        from_dict({**BASE, "moe_num_experts": 2, "moe_glu": True})
    with pytest.raises(ConfigError, match="sequence_parallel"):
        from_dict({**BASE, "moe_num_experts": 2, "model_parallel_size": 2, "sequence_parallel": True})
    m = from_dict({**BASE, "moe_num_experts": 2, "moe_loss_coeff": 0.1, "expert_interval": 2}).model
    assert (m.moe_aux_loss_coeff, m.moe_expert_interval) == (0.1, 2)


# ---------------------------------------------------------------- parameter and FLOP counts


def test_info_counts_total_and_active_parameters():
    from neox.model import info

    cfg = moe_cfg(
        num_layers=3, moe_expert_interval=2, moe_num_shared_experts=1, activation="swiglu", intermediate_size=8
    )
    model = GPT(cfg)
    assert info.num_params(cfg) == sum(p.numel() for p in model.parameters())
    h, inter, e, k = 16, 8, 4, 2
    per_expert = 3 * h * inter
    # blocks 0 and 2 are MoE: a token skips e - k experts in each
    assert info.num_active_params(cfg) == info.num_params(cfg) - 2 * (e - k) * per_expert
    dense = from_dict({**BASE, "num_layers": 3, "activation": "swiglu", "intermediate_size": 8}).model
    # active FLOPs: the dense model's, less two dense MLPs (with biases), plus router + k experts + shared
    dense_mlp = 3 * h * inter + 2 * inter + h
    moe_active = h * e + k * per_expert + per_expert
    assert info.flops_per_token(cfg) == info.flops_per_token(dense) + 6 * 2 * (moe_active - dense_mlp)
