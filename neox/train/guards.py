"""Numerical guards: a non-finite loss or gradient norm, or a loss spike, never reaches the weights.

Each step gets a verdict on the device, `[code, zscore, loss, norm]` (code 0 = fine, NONFINITE, SPIKE), from the
step's loss and global gradient norm without reading either on the host:
- non-finite: the loss or the gradient norm is NaN or inf. Under fp16 a non-finite norm is the loss scaler's
  overflow (it skips the step and lowers the scale, as before) and only a non-finite loss is the guard's, so a
  step is counted once, by one of them;
- loss spike (`train.loss_spike_window` > 0): z = (loss - mean) / std over the last `window` accepted steps'
  losses (std with n - 1), checked once the window is full; z > `train.loss_spike_zscore` is a spike. Steps the
  guards reject do not enter the window, so a spike does not widen the band that judges the next step.
The loss judged is the mean over data-parallel ranks. Under several processes one all-reduce over all ranks
per step (two numbers: the loss and a "bad" count) gives every rank the same loss, history and verdict, even
when only one rank's gradients went bad after their reduction. It is a collective, not a host read.

The offending update is skipped whatever the policy: with a fused Adam/AdamW (plain tensors on one device:
one process, DDP, pipeline stages) through the optimizer's `found_inf` input, on the device, so the step
reads nothing on the host; parameters, both moments and the step count stay as they were. Other optimizers
(foreach Adam over DTensors under FSDP or tensor parallelism, SGD) read the verdict on the host once a step to
decide, and fp16 reads it together with the overflow check it already makes.

The policy (`train.nonfinite_policy`, `train.loss_spike_policy`) acts on the host when the verdicts are read:
at the next log line, or before a checkpoint is saved (so a checkpoint never follows an unexamined step):
- skip: the batch is consumed and the step counts as taken (iteration, data position and learning-rate schedule
  advance: the schedule follows the iteration, unlike fp16 overflow skips, which DeepSpeed does not count);
- rollback: reload the newest checkpoint from before the offending step and go on from the data position after
  the last offending batch, so the batches between that checkpoint and it are not trained on either (re-running
  them would lead back to the same state); at most `train.max_rollbacks` times, then stop;
- stop: end the run with one line naming the step and the values; nothing is saved on the way out, so the
  newest checkpoint is the last one from before the event.
Every event is a metrics.jsonl record: {"event", "iteration", "policy", "values", "samples", "documents"}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from neox.config.schema import TrainConfig
from neox.errors import NeoxError
from neox.parallel.comm import all_reduce_

NONFINITE, SPIKE = 1, 2
KINDS = {NONFINITE: "nonfinite", SPIKE: "loss_spike"}
POLICY_KEYS = {NONFINITE: "train.nonfinite_policy", SPIKE: "train.loss_spike_policy"}


class GuardStop(NeoxError):
    """A guard's stop policy, or one rollback too many, ended the run (nothing was saved on the way out)."""


@dataclass
class Event:
    """One rejected step, as the host learns of it."""

    code: int
    iteration: int  # the iteration the step would have completed
    loss: float  # mean over data-parallel ranks (tensor and pipeline ranks hold the same value)
    grad_norm: float
    zscore: float
    first_sample: int  # the step's global samples are first_sample .. first_sample + global_batch - 1

    @property
    def kind(self) -> str:
        return KINDS[self.code]

    def describe(self) -> str:
        if self.code == NONFINITE:
            return f"non-finite loss {self.loss:g} / gradient norm {self.grad_norm:g}"
        return f"loss spike {self.loss:.4f} (z-score {self.zscore:.1f})"


def fused_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group runs torch's fused kernels, which take a device-side `found_inf`."""
    return all(group.get("fused") for group in optimizer.param_groups)


class Guards:
    """The per-step verdict (on the device) and the host-side record of events, rollbacks and counts."""

    def __init__(self, cfg: TrainConfig, device: torch.device, world_size: int = 1, fp16: bool = False):
        self.policies = {NONFINITE: cfg.nonfinite_policy, SPIKE: cfg.loss_spike_policy}
        self.window = int(cfg.loss_spike_window)
        self.threshold = float(cfg.loss_spike_zscore)
        self.max_rollbacks = int(cfg.max_rollbacks)
        self.world_size = world_size
        self.fp16 = fp16
        self.device = device
        self.history = torch.zeros(self.window, dtype=torch.float32, device=device)
        self.filled = torch.zeros((), dtype=torch.float32, device=device)  # accepted losses seen, up to window
        self.counts = {"nonfinite": 0, "loss_spike": 0, "rollbacks": 0}

    # ------------------------------------------------------------ on the device, every step
    def verdict(self, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """[code, zscore, loss, norm] of one step (the loss averaged over ranks), a float32 tensor on the
        device; updates the spike window. A handful of scalar kernels, none of which waits."""
        loss = loss.detach().float().reshape(())
        norm = norm.detach().float().reshape(()).to(loss.device)
        # one check for both: the norm is >= 0, so loss + norm is finite exactly when both are
        bad = ~torch.isfinite(loss if self.fp16 else loss + norm)
        if self.world_size > 1 and dist.is_initialized():
            both = torch.stack([loss, bad.float()])
            all_reduce_(both, None)  # every rank: the same mean loss and whether any rank saw a bad step
            loss, bad = both[0] / self.world_size, both[1] > 0
        if self.window == 0:
            return torch.stack([bad.float(), torch.zeros_like(loss), loss, norm])
        z = self.zscore(loss)
        spike = (z > self.threshold) & (self.filled >= self.window) & ~bad
        code = bad.float() * NONFINITE + spike.float() * SPIKE
        self._remember(loss, ~(bad | spike))
        return torch.stack([code, z, loss, norm])

    def zscore(self, loss: torch.Tensor) -> torch.Tensor:
        """(loss - mean) / std of the window (std with n - 1); meaningful once the window is full."""
        std, mean = torch.std_mean(self.history)
        return (loss - mean) / std

    def _remember(self, loss: torch.Tensor, accepted: torch.Tensor) -> None:
        shifted = torch.cat([self.history[1:], loss.reshape(1)])
        self.history = torch.where(accepted, shifted, self.history)
        self.filled = torch.clamp(self.filled + accepted.float(), max=float(self.window))

    def arm(self, optimizer: torch.optim.Optimizer, verdict: torch.Tensor) -> None:
        """Make the next fused optimizer step a no-op when the verdict is bad (decided on the device)."""
        optimizer.found_inf = (verdict[0] > 0).float()

    # ------------------------------------------------------------ on the host, when verdicts are read
    def policy(self, event: Event) -> str:
        return self.policies[event.code]

    def count(self, event: Event) -> None:
        self.counts[event.kind] += 1

    @property
    def skipped(self) -> int:
        return self.counts["nonfinite"] + self.counts["loss_spike"]

    def check_rollback_budget(self, event: Event, last_good: str | None) -> None:
        """Raise GuardStop once a rollback would be one more than train.max_rollbacks."""
        if self.counts["rollbacks"] < self.max_rollbacks:
            return
        raise GuardStop(
            f"step {event.iteration}: {event.describe()} after {self.counts['rollbacks']} rollback(s) "
            f"(train.max_rollbacks: {self.max_rollbacks}); stopping, nothing saved (newest checkpoint: "
            f"{last_good or 'none'}); see the events in metrics.jsonl for the samples"
        )

    def stop(self, event: Event, last_good: str | None) -> GuardStop:
        return GuardStop(
            f"step {event.iteration}: {event.describe()}; stopping ({POLICY_KEYS[event.code]}: stop), nothing "
            f"saved (newest checkpoint: {last_good or 'none'})"
        )

    def state_dict(self) -> dict:
        """For a checkpoint (a host read of the window: saves are sync points anyway)."""
        state = {"counts": dict(self.counts)}
        if self.window > 0:
            state["history"] = self.history.tolist()
            state["filled"] = float(self.filled)
        return state

    def load_state_dict(self, state: dict | None, counts: bool = True) -> None:
        """Restore the spike window (when its size matches) and, unless `counts` is False (a rollback keeps
        this run's tally), the event counts."""
        if not state:
            return
        if counts:
            self.counts.update({k: int(v) for k, v in state.get("counts", {}).items() if k in self.counts})
        history = state.get("history")
        if self.window > 0 and history is not None and len(history) == self.window:
            self.history = torch.tensor(history, dtype=torch.float32, device=self.device)
            self.filled = torch.tensor(float(state.get("filled", 0.0)), dtype=torch.float32, device=self.device)


def documents_of(dataset, sample: int) -> list:
    """The documents a global training sample draws from: ids in its dataset, or [dataset, id] pairs in a blend
    (empty when the dataset cannot say)."""
    if hasattr(dataset, "source") and hasattr(dataset, "datasets"):
        which, local = dataset.source(sample)
        return [[which, d] for d in documents_of(dataset.datasets[which], local)]
    if hasattr(dataset, "document_ids"):
        return [int(d) for d in dataset.document_ids(sample)]
    return []


def event_record(event: Event, policy: str, samples: list[int], documents: list) -> dict:
    """The metrics.jsonl line of an event (values nested, so TensorBoard's loss curve does not get them)."""
    values = {"loss": event.loss, "grad_norm": event.grad_norm}
    if event.code == SPIKE:
        values["zscore"] = event.zscore
    values = {k: v if math.isfinite(v) else str(v) for k, v in values.items()}
    return {
        "iteration": event.iteration,
        "event": event.kind,
        "policy": policy,
        "values": values,
        "samples": samples,
        "documents": documents,
    }
