"""Learning-rate schedule with GPT-NeoX's AnnealingLR semantics.

With W warmup iterations and D decay iterations (lr_decay_iters, default train_iters), the rate used for
the update that takes the model from iteration i to i+1 is:

    i <= W (and W > 0):  lr * i / W                                   (so the first update has rate 0)
    otherwise, n = min(i - W, D - W) and E = D - W:
      constant:     lr
      linear:       lr * (E - n) / E
      cosine:       min_lr + (lr - min_lr) * (1 + cos(pi * n / E)) / 2
      exponential:  lr * exp(-0.693 * n / E)                           (halves over the decay)
    floored at min_lr.

Past D the rate stays at its end value (GPT-NeoX lets cosine climb back up after D; that is a bug, not a
feature worth keeping). The schedule is a pure function of the iteration, so resuming needs only the
iteration, but its parameters are saved too so a resume with a changed schedule is reported.
"""

from __future__ import annotations

import math

import torch

from neox.config.schema import ScheduleConfig
from neox.errors import ConfigError

STYLES = ("constant", "linear", "cosine", "exponential")


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, lr: float, train_iters: int):
        if cfg.lr_decay_style not in STYLES:
            raise ConfigError(f"schedule.lr_decay_style: unknown style {cfg.lr_decay_style!r}; use one of {STYLES}")
        if cfg.lr_decay_fraction is not None:
            decay_iters = int(cfg.lr_decay_fraction * train_iters)
        elif cfg.lr_decay_iters is not None:
            decay_iters = cfg.lr_decay_iters
        else:
            decay_iters = train_iters
        self.decay_iters = max(1, int(decay_iters))
        if cfg.warmup_iters is not None:
            self.warmup_iters = int(cfg.warmup_iters)
        else:
            self.warmup_iters = int(cfg.warmup * self.decay_iters)
        if self.warmup_iters < 0:
            raise ConfigError(f"schedule.warmup_iters must be >= 0, got {self.warmup_iters}")
        self.style = cfg.lr_decay_style
        self.lr = float(lr)
        self.min_lr = float(cfg.min_lr)

    def lr_at(self, iteration: int) -> float:
        w = self.warmup_iters
        if w > 0 and iteration <= w:
            return self.lr * iteration / w
        span = self.decay_iters - w
        if span <= 0:  # warmup covers the whole decay span: hold the peak afterwards
            return max(self.lr, self.min_lr)
        n = min(iteration - w, span)
        if self.style == "linear":
            lr = self.lr * (span - n) / span
        elif self.style == "cosine":
            lr = self.min_lr + (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * n / span)) / 2.0
        elif self.style == "exponential":
            lr = self.lr * math.exp(-0.693 * n / span)
        else:
            lr = self.lr
        return max(lr, self.min_lr)

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set every parameter group's rate for the update at `iteration` (times the group's `lr_scale`, muP's
        per-group multiplier, when it has one); returns the unscaled rate."""
        lr = self.lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {
            "style": self.style,
            "lr": self.lr,
            "min_lr": self.min_lr,
            "warmup_iters": self.warmup_iters,
            "decay_iters": self.decay_iters,
        }

    def changes_from(self, saved: dict) -> list[str]:
        """Human-readable differences between this schedule and a saved one (empty when equal)."""
        mine = self.state_dict()
        return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
