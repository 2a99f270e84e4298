"""neox's training step against a hand-written loop: the same initial weights and micro-batches through
F.cross_entropy, gradient accumulation, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW over hand-built
weight-decay groups and the learning-rate schedule written out as a formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neox.model import GPT
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config

STEPS, ACCUM, MICRO = 4, 2, 2
LR, MIN_LR, WARMUP, WEIGHT_DECAY, CLIP = 3e-3, 2e-4, 2, 0.1, 0.05
BETAS, EPS = (0.9, 0.95), 1e-8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=100)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def record_steps(trainer: Trainer) -> list[list[dict]]:
    """Copies of the micro-batches of every optimizer step `trainer.fit()` takes (its train_step, wrapped)."""
    steps, step = [], trainer.train_step

    def recording(micro_batches):
        steps.append([{k: v.clone() for k, v in mb.items()} for mb in micro_batches])
        return step(micro_batches)

    trainer.train_step = recording
    return steps


def lr_formula(style: str, i: int) -> float:
    """GPT-NeoX's AnnealingLR with W warmup and D = STEPS decay iterations (min_lr floor), by hand."""
    if i <= WARMUP:
        return LR * i / WARMUP
    n, span = min(i - WARMUP, STEPS - WARMUP), STEPS - WARMUP
    if style == "cosine":
        lr = MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * n / span))
    elif style == "linear":
        lr = LR * (span - n) / span
    else:
        raise ValueError(style)
    return max(lr, MIN_LR)


def weight_decay_groups(model: torch.nn.Module) -> list[dict]:
    """GPT-NeoX decays the weight matrices of linear and embedding layers; biases and norm gains are not."""
    decay, plain = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            matrix = isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and name == "weight"
            (decay if matrix else plain).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": plain, "weight_decay": 0.0}]


def masked_mean_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=-100)
    keep = mask.flatten().float() * (labels.flatten() != -100)
    return (losses * keep).sum() / keep.sum()


def reference_run(cfg, initial: dict, steps: list[list[dict]], style: str):
    """Returns (final state dict, per-step losses, per-step gradient norms before clipping)."""
    model = GPT(cfg.model)
    model.load_state_dict(initial)
    groups = weight_decay_groups(model)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    losses, norms = [], []
    for i, micro_batches in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = lr_formula(style, i)
        total = 0.0
        for mb in micro_batches:
            loss = masked_mean_ce(model(mb["tokens"]), mb["labels"], mb["loss_mask"])
            (loss / len(micro_batches)).backward()
            total += loss.item()
        losses.append(total / len(micro_batches))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
    return model.state_dict(), losses, norms


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_trainer_steps_match_hand_written_loop(corpus, style):
    cfg = tiny_config(
        corpus,
        train={
            "train_iters": STEPS,
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": ACCUM,
            "gradient_clipping": CLIP,
        },
        # EOD inputs masked: micro-batches keep different token counts, so the per-micro-batch mean matters
        data={"eod_mask_loss": True},
        optimizer={"type": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "eps": EPS},
        schedule={"lr_decay_style": style, "warmup_iters": WARMUP, "min_lr": MIN_LR},
        eval={"eval_iters": 0},
    )
    trainer = Trainer(cfg, quiet=True)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    steps = record_steps(trainer)
    trainer.fit()

    assert len(steps) == STEPS and all(len(s) == ACCUM for s in steps)
    counts = {float(mb["loss_mask"].sum()) for s in steps for mb in s}
    assert len(counts) > 1, "every micro-batch kept the same number of tokens: normalisation untested"

    want, losses, norms = reference_run(trainer.cfg, initial, steps, style)
    assert all(n > CLIP for n in norms), "clipping never engaged"
    assert trainer.losses == pytest.approx(losses, abs=1e-6)
    got = trainer.model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
        assert not torch.equal(want[k], initial[k]), f"{k} never moved"
    # the schedule covered warmup (rate 0 first), the peak and the decay below it
    rates = [lr_formula(style, i) for i in range(STEPS)]
    assert rates[0] == 0.0 and rates[WARMUP] == LR and MIN_LR <= rates[-1] < LR


def test_weight_decay_reaches_only_matrices(corpus):
    """One update at lr > 0 with zero gradients: AdamW's decoupled decay alone moves the weights, so which
    parameters shrank by exactly lr * weight_decay shows the groups (biases and norms must not)."""
    cfg = tiny_config(
        corpus, optimizer={"type": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY}, eval={"eval_iters": 0}
    )
    trainer = Trainer(cfg, quiet=True)
    model, opt = trainer.model, trainer.optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.5
    opt.step()
    decayed = {id(p) for g in weight_decay_groups(model) if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * WEIGHT_DECAY if id(p) in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-7, msg=name)
