"""Sequence-length curriculum (DeepSpeed's legacy `curriculum_learning` with `curriculum_type: seqlen`).

The length for optimizer step s (1-based: the step about to run, as GPT-NeoX asks for `iteration + 1`):
- fixed_linear / fixed_root: floor((s / total_steps) ** (1 / degree) * (max - min) + min), lowered to a
  multiple of difficulty_step, raised to the first multiple of difficulty_step at or above min (so the
  first steps never get a zero length), capped at max; fixed_linear is degree 1.
- fixed_discrete: difficulties[i] for the first i with s <= max_steps[i]; the last difficulty after them.
DeepSpeed keeps the current length as state and stops recomputing once it reaches max_difficulty (so a
discrete schedule that reaches the maximum early stays there): `Curriculum` does the same, and the state
travels in checkpoints so a resumed run continues exactly.

As in GPT-NeoX, each sample keeps its place in the data order and is truncated to the current length (the
rest of it is not used); nothing is re-packed, so samples consumed (the resume position) advance as without
a curriculum and only the tokens trained on change.
"""

from __future__ import annotations

import math

import torch

from neox.config.schema import TrainConfig


def seqlen_at(tr: TrainConfig, step: int) -> int:
    """The schedule's length for 1-based optimizer step `step`, without DeepSpeed's stop-at-max state."""
    low, high = tr.curriculum_min_difficulty, tr.curriculum_max_difficulty
    if tr.curriculum_schedule_type == "fixed_discrete":
        for length, last in zip(tr.curriculum_difficulties, tr.curriculum_max_steps):
            if step <= last:
                return length
        return tr.curriculum_difficulties[-1]
    degree = 1.0 if tr.curriculum_schedule_type == "fixed_linear" else float(tr.curriculum_root_degree)
    fraction = (float(step) / tr.curriculum_total_steps) ** (1.0 / degree)
    length = math.floor(fraction * (high - low) + low)
    unit = tr.curriculum_difficulty_step
    length -= length % unit
    length = max(length, -(-low // unit) * unit)
    return min(length, high)


class Curriculum:
    """The current sequence length of a run; `advance(step)` before each step, as DeepSpeed's
    update_difficulty(global_steps + 1)."""

    def __init__(self, tr: TrainConfig):
        self.tr = tr
        self.current = tr.curriculum_min_difficulty

    def advance(self, step: int) -> int:
        if self.current < self.tr.curriculum_max_difficulty:
            self.current = seqlen_at(self.tr, step)
        return self.current

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = int(state["current"])


def truncate(batch: dict, length: int) -> dict:
    """The micro-batch with every per-token tensor ([b, T]: tokens, labels, loss mask, positions, segments)
    cut to its first `length` tokens; the loss is then the mean over the tokens kept."""
    return {k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in batch.items()}
