"""The training objective of ``train.train_impl``: None for language modelling (the runner's masked-mean cross
entropy), else an object the trainer uses as the runner's loss function and as its data source and reference
(neox.train.preference: dpo, kto, rm; neox.train.reinforce: reinforce)."""

from __future__ import annotations

from neox.train.preference import PreferenceObjective, prepare_reference
from neox.train.reinforce import ReinforceObjective, RewardFn, Sampler

__all__ = ["build_objective", "prepare_reference"]


def build_objective(train_cfg, sampler: Sampler | None = None, reward_fn: RewardFn | None = None):
    if train_cfg.train_impl == "normal":
        return None
    if train_cfg.train_impl == "reinforce":
        return ReinforceObjective(train_cfg, sampler, reward_fn)
    return PreferenceObjective(train_cfg)
