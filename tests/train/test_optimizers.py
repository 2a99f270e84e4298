"""Lion, SM3, MADGRAD, Adafactor and Muon+AdamW: updates against the papers' formulas (float64 NumPy written
from the definitions), then each one training the tiny model and resuming bitwise."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from neox.config.schema import OptimizerConfig
from neox.errors import ConfigError
from neox.train import optim
from neox.train.optim import build_optimizer, muon_eligible
from neox.train.optimizers import MADGRAD, SM3, Lion, MuonWithAdamW
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config

STEPS = 4


def _grads(shape, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]


def _run_torch(opt_factory, p0, grads):
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = opt_factory([p])
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


def test_lion_is_the_sign_of_interpolated_momentum_with_decoupled_decay():
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    p0, grads = np.random.default_rng(1).standard_normal((3, 5)), _grads((3, 5))
    p, m = p0.copy(), np.zeros_like(p0)
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p * (1 - lr * wd) - lr * np.sign(c)
        m = b2 * m + (1 - b2) * g
    got = _run_torch(lambda ps: Lion([{"params": ps, "weight_decay": wd}], lr=lr, betas=(b1, b2)), p0, grads)
    np.testing.assert_allclose(got, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta,momentum", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5)])
def test_sm3_keeps_one_accumulator_per_row_and_column(beta, momentum):
    lr, eps = 0.1, 1e-30
    p0, grads = np.random.default_rng(2).standard_normal((3, 4)), _grads((3, 4))
    p, row, col = p0.copy(), np.zeros(3), np.zeros(4)
    buf = np.zeros_like(p0)
    for g in grads:
        nu = np.empty_like(g)
        for i in range(3):
            for j in range(4):
                prior = min(row[i], col[j])
                nu[i, j] = beta * prior + (1 - beta) * g[i, j] ** 2 if beta else prior + g[i, j] ** 2
        new_row, new_col = nu.max(axis=1), nu.max(axis=0)
        row, col = (np.maximum(row, new_row), np.maximum(col, new_col)) if beta else (new_row, new_col)
        update = g / np.sqrt(nu + eps)
        if momentum:
            buf = momentum * buf + (1 - momentum) * update
            update = buf
        p = p - lr * update
    got = _run_torch(lambda ps: SM3(ps, lr=lr, momentum=momentum, beta=beta, eps=eps), p0, grads)
    np.testing.assert_allclose(got, p, rtol=1e-12, atol=1e-12)


def test_sm3_state_is_the_sum_of_the_dimensions_not_their_product():
    p = torch.nn.Parameter(torch.zeros(6, 7, 8))
    opt = SM3([p])
    p.grad = torch.randn(6, 7, 8)
    opt.step()
    shapes = sorted(tuple(v.shape) for k, v in opt.state[p].items() if k.startswith("accumulator"))
    assert shapes == [(1, 1, 8), (1, 7, 1), (6, 1, 1)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_madgrad_is_dual_averaging_with_a_cube_root_denominator(momentum):
    lr, eps, wd = 0.01, 1e-6, 0.05
    p0, grads = np.random.default_rng(3).standard_normal((2, 5)), _grads((2, 5))
    p, s, v, x0 = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), p0.copy()
    for k, g in enumerate(grads):
        lam = lr * math.sqrt(k + 1)
        p = p * (1 - lr * wd)
        if momentum == 0:
            x0 = p + s / (np.cbrt(v) + eps)
        s, v = s + lam * g, v + lam * g * g
        z = x0 - s / (np.cbrt(v) + eps)
        p = (1 - (1 - momentum)) * p + (1 - momentum) * z if momentum else z
    got = _run_torch(
        lambda ps: MADGRAD([{"params": ps, "weight_decay": wd}], lr=lr, momentum=momentum, eps=eps), p0, grads
    )
    np.testing.assert_allclose(got, p, rtol=1e-10, atol=1e-12)


def test_adafactor_factors_the_second_moment_of_a_matrix():
    # Shazeer & Stern 2018 as torch.optim.Adafactor states it: beta2_t = 1 - t^-0.8, row/column moments,
    # rho_t = min(lr, 1/sqrt(t)), alpha = max(eps2, RMS(p)) * rho_t, update clipped to RMS <= d
    lr, eps1, eps2, d = 0.01, None, 1e-3, 1.0
    p0, grads = np.random.default_rng(4).standard_normal((3, 4)), _grads((3, 4))
    p, r, c = p0.copy(), np.zeros(3), np.zeros(4)
    for t, g in enumerate(grads, 1):
        beta2 = 1 - t**-0.8
        rho = min(lr, 1 / math.sqrt(t))
        alpha = max(eps2, math.sqrt(np.mean(p * p))) * rho
        e1 = np.finfo(np.float64).eps if eps1 is None else eps1
        r = beta2 * r + (1 - beta2) * (g * g).mean(axis=1)
        c = beta2 * c + (1 - beta2) * (g * g).mean(axis=0)
        v = np.outer(r, c) / r.mean()
        u = g / np.sqrt(np.maximum(v, e1 * e1))
        u = u / max(1.0, math.sqrt(np.mean(u * u)) / d)
        p = p - alpha * u
    cfg = OptimizerConfig(type="adafactor", lr=lr)
    model = torch.nn.Linear(4, 3, bias=False).double()
    model.weight.data = torch.tensor(p0)
    opt = build_optimizer(model, cfg)
    for g in grads:
        model.weight.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(model.weight.detach().numpy(), p, rtol=1e-6, atol=1e-8)


def _newton_schulz(g, steps=5, a=3.4445, b=-4.7750, c=2.0315, eps=1e-7):
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / max(np.linalg.norm(x), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_in = torch.nn.Embedding(10, 6)
        self.proj = torch.nn.Linear(6, 8)  # a hidden matrix: Muon; its bias: AdamW
        self.norm = torch.nn.LayerNorm(8)


def test_muon_orthogonalises_hidden_matrices_and_adamw_takes_the_rest():
    torch.manual_seed(0)
    model = _Tiny()
    twin = _Tiny()
    twin.load_state_dict(model.state_dict())
    assert [n for n, p in model.named_parameters() if muon_eligible(n, p)] == ["proj.weight"]
    lr, mom = 0.02, 0.9
    opt = build_optimizer(model, OptimizerConfig(type="muon", lr=lr, betas=[mom, 0.95], weight_decay=0.0))
    assert isinstance(opt, MuonWithAdamW)
    adamw = torch.optim.AdamW(
        [p for n, p in twin.named_parameters() if n != "proj.weight"], lr=lr, betas=(mom, 0.95), weight_decay=0.0
    )
    w, buf = model.proj.weight.detach().double().numpy().copy(), np.zeros((8, 6))
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for m in (model, twin):
            for n, p in m.named_parameters():
                p.grad = grads[n].clone()
        opt.step()
        adamw.step()
        g = grads["proj.weight"].double().numpy()
        buf = mom * buf + (1 - mom) * g  # torch's Muon: momentum as an average, Nesterov look-ahead
        update = _newton_schulz((1 - mom) * g + mom * buf)
        w = w - lr * 0.2 * math.sqrt(8) * update  # rescaled to AdamW's update RMS
    # Newton-Schulz runs in bf16 in torch: close to the float64 formula, not equal
    np.testing.assert_allclose(model.proj.weight.detach().numpy(), w, atol=2e-3)
    for n, p in twin.named_parameters():
        if n != "proj.weight":
            assert torch.equal(p, dict(model.named_parameters())[n]), n


def test_muon_state_dict_round_trip_keeps_both_halves():
    torch.manual_seed(0)
    model = _Tiny()
    opt = build_optimizer(model, OptimizerConfig(type="muon", lr=0.01))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    fresh = build_optimizer(model, OptimizerConfig(type="muon", lr=0.01))
    fresh.load_state_dict(state)
    keys = {k for s in fresh.state.values() for k in s}
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq"} <= keys
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    fresh.step()  # the inner optimizers were re-pointed at the loaded state
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


KINDS = {
    "lion": {"lr": 3e-4, "betas": [0.9, 0.99], "weight_decay": 0.1},
    "sm3": {"lr": 0.05, "momentum": 0.5, "beta": 0.9},
    "madgrad_wd": {"lr": 3e-3, "momentum": 0.9, "eps": 1e-6},
    "adafactor": {"lr": 1.0},  # a cap on the relative step size min(lr, 1/sqrt(t)), scaled by RMS(p)
    "muon": {"lr": 3e-3, "weight_decay": 0.01},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_optimizer_trains_and_resumes_bitwise(corpus, tmp_path, kind):
    torch.set_num_threads(1)
    groups = dict(optimizer={"type": kind, **KINDS[kind]}, eval={"eval_iters": 0})

    def run(cfg, stop_at=None):
        t = Trainer(cfg, quiet=True)
        t.fit(stop_at)
        return t

    straight = run(tiny_config(corpus, tmp_path / "a", **groups))
    first = run(tiny_config(corpus, tmp_path / "b", **groups), stop_at=10)
    resumed = run(tiny_config(corpus, tmp_path / "b", checkpoint={"load": str(tmp_path / "b")}, **groups))
    assert first.losses + resumed.losses == straight.losses
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.mean(straight.losses[-5:]) < np.mean(straight.losses[:5]) - 0.2, straight.losses


def test_bnb_optimizer_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setattr(optim, "load_bitsandbytes", lambda: None)
    with pytest.raises(ConfigError, match=r"bitsandbytes is not installed: pip install bitsandbytes"):
        build_optimizer(torch.nn.Linear(4, 4), OptimizerConfig(use_bnb_optimizer=True))
    with pytest.raises(ConfigError, match=r"8-bit state exists for adam and adamw, not 'lion'"):
        build_optimizer(torch.nn.Linear(4, 4), OptimizerConfig(type="lion", use_bnb_optimizer=True))


def test_bnb_optimizer_gets_the_parameter_groups(monkeypatch):
    # a stand-in records what neox hands bitsandbytes' 8-bit AdamW (the real one: tests/train/test_bnb.py)
    made = {}

    class AdamW8bit:
        def __init__(self, groups, **kwargs):
            made.update(groups=groups, **kwargs)

    stand_in = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit))
    monkeypatch.setattr(optim, "load_bitsandbytes", lambda: stand_in)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    build_optimizer(model, OptimizerConfig(use_bnb_optimizer=True, lr=1e-3, betas=[0.9, 0.99], weight_decay=0.1))
    assert made["lr"] == 1e-3 and made["betas"] == (0.9, 0.99)
    assert [(g["name"], len(g["params"]), g["weight_decay"]) for g in made["groups"]] == [
        ("decay", 1, 0.1),
        ("no_decay", 3, 0.0),
    ]
