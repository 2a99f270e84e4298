"""GPT-NeoX's diagnostics: the gradient noise scale against a hand computation on synthetic gradients, and the
per-parameter norms in metrics.jsonl against torch.linalg.vector_norm of each gradient and weight, read at
log lines only."""

from __future__ import annotations

import json

import pytest
import torch

from neox.config import from_dict
from neox.errors import ConfigError
from neox.train.diagnostics import GradientNoiseScale
from neox.train.trainer import Trainer

from ..syncs import count_syncs
from .test_syncs import traced
from .tiny_run import make_corpus, tiny_config


def hand_noise_scale(grads: list[list[float]], b_small: int, n: int, beta: float = 0.99) -> float | None:
    """GPT-NeoX's estimator written out in plain floats: every n-th step, |G_big|^2 of the mean of the last
    n gradients and |G_small|^2 of the last one; |G|^2 and tr(Sigma) from the two; bias-corrected EMAs of
    each (the correction counts every update, as GPT-NeoX's does); their ratio."""
    b_big = b_small * n
    ema_g = ema_s = 0.0
    result = None
    for i in range(n - 1, len(grads), n):
        window = grads[i - n + 1 : i + 1]
        mean = [sum(col) / n for col in zip(*window)]
        g_big = sum(x * x for x in mean)
        g_small = sum(x * x for x in grads[i])
        g2 = (b_big * g_big - b_small * g_small) / (b_big - b_small)
        trace = (g_small - g_big) / (1 / b_small - 1 / b_big)
        ema_g = beta * ema_g + (1 - beta) * g2
        ema_s = beta * ema_s + (1 - beta) * trace
        correction = 1 - beta ** (i + 1)
        result = (ema_s / correction) / (ema_g / correction)
    return result


def test_noise_scale_matches_the_hand_computation():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)  # weight [2, 3] + bias [2]: 8 numbers per gradient
    true = torch.randn(8, generator=gen)
    steps = [(true + 2.0 * torch.randn(8, generator=gen)).tolist() for _ in range(12)]
    gns = GradientNoiseScale(batch_size_small=4, n_batches=3)
    seen = []
    for g in steps:
        flat = torch.tensor(g)
        model.weight.grad, model.bias.grad = flat[:6].view(2, 3).clone(), flat[6:].clone()
        gns.update(model, None)
        seen.append(None if gns.noise_scale is None else float(gns.noise_scale))
    assert seen[:2] == [None, None]  # nothing until the first big batch
    for k in range(3, 13):
        expected = hand_noise_scale(steps[:k], 4, 3)
        assert seen[k - 1] == pytest.approx(expected, rel=1e-4), k  # fp32 sums against Python floats
    assert seen[-1] > 0


def test_noise_scale_skips_a_non_finite_big_batch():
    model = torch.nn.Linear(1, 1, bias=False)
    gns = GradientNoiseScale(batch_size_small=2, n_batches=2)
    for g in (1.0, 3.0):
        model.weight.grad = torch.tensor([[g]])
        gns.update(model, None)
    before = float(gns.noise_scale)
    for g in (float("nan"), 1.0):
        model.weight.grad = torch.tensor([[g]])
        gns.update(model, None)
    assert float(gns.noise_scale) == before  # the running averages are left as they were


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=100)


def diagnostics_config(corpus, run_dir, **logging):
    return tiny_config(
        corpus,
        run_dir,
        train={"train_iters": 6, "gradient_clipping": 0.5},
        eval={"eval_interval": 0, "eval_iters": 0},
        logging={
            "log_interval": 3,
            "log_grad_norm": True,
            "log_param_norm": True,
            "log_gradient_noise_scale": True,
            "gradient_noise_scale_n_batches": 2,
            **logging,
        },
    )


def test_per_parameter_norms_are_those_of_each_gradient_and_weight(corpus, tmp_path):
    torch.set_num_threads(1)
    trainer = Trainer(diagnostics_config(corpus, tmp_path), quiet=True)
    grads_at = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):  # the gradients the optimizer steps with (after clipping), per iteration
        grads_at[trainer.iteration + 1] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in logged] == [3, 6]
    names = [n for n, _ in trainer.model.named_parameters()]
    for r in logged:
        for name in names:
            want = float(torch.linalg.vector_norm(grads_at[r["iteration"]][name]))
            assert r[f"gradient_norms/{name}"] == pytest.approx(want, rel=1e-6, abs=1e-9), name
    for name, p in trainer.model.named_parameters():  # the weights after the last step
        assert logged[-1][f"parameter_norms/{name}"] == pytest.approx(
            float(torch.linalg.vector_norm(p.detach())), rel=1e-6
        )
    assert all(isinstance(r["noise_scale"], float) for r in logged)
    # parameter norms are not gradient norms (the keys are not crossed)
    assert logged[-1]["parameter_norms/embed_in.weight"] != logged[-1]["gradient_norms/embed_in.weight"]


def test_steps_stay_free_of_host_reads(corpus, tmp_path):
    torch.set_num_threads(1)
    trainer = Trainer(diagnostics_config(corpus, tmp_path), quiet=True)
    steps, logs = traced(trainer)
    with count_syncs():
        trainer.fit()
    assert steps == [[]] * 6  # the noise scale's running sums and the norms stay on the device
    assert [len(x) for x in logs] == [2, 2], logs  # the window's losses, then the diagnostics: one read each


def test_gpt_neox_keys_and_bad_values():
    cfg = from_dict({"log_grad_norm": True, "log_param_norm": True, "log_gradient_noise_scale": True})
    assert (cfg.logging.log_grad_norm, cfg.logging.log_param_norm, cfg.logging.log_gradient_noise_scale) == (
        True,
        True,
        True,
    )
    with pytest.raises(ConfigError, match="gradient_noise_scale_n_batches"):
        from_dict({"gradient_noise_scale_n_batches": 1})
