"""The contract between the training loop and a parallel layout: a `StepRunner` runs one optimizer step's
micro-batches through the model (and one evaluation batch) however the layout needs it.

`neox.parallel.parallelize` returns the runner for a layout: a `LocalRunner` for one process and for
data/tensor parallelism, a `neox.parallel.pipeline.PipelineRunner` for pipeline stages. The trainer calls
only the methods declared here, so it never asks which layout it runs under.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from neox.model.moe import set_aux_loss_scale
from neox.parallel.fsdp import set_gradient_sync
from neox.parallel.reduce import loss_context, masked_mean_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class StepRunner(Protocol):
    def forward_backward(self, micro_batches: list[dict], loss_scale: float = 1.0) -> torch.Tensor:
        """Accumulate in `.grad` the gradients of (mean over micro-batches of each one's masked-mean token
        loss) * loss_scale; return that mean loss (a 0-d tensor, the same on every rank of a pipeline)."""
        ...

    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The masked-mean token loss of one micro-batch, without gradients."""
        ...

    def eval_rows(self, batch: dict, fn: LossFn) -> torch.Tensor:
        """`fn(logits, labels, loss_mask)` of one micro-batch (one number per row, e.g. sequence
        log-probabilities) in evaluation mode without gradients: a CPU fp32 tensor, the same on every rank."""
        ...


class LocalRunner:
    """Plain autograd over this process's (possibly DDP/FSDP/TP-wrapped) model.

    Data-parallel wrappers reduce gradients only on the last micro-batch of a step; vocab-sharded logits
    (tensor parallelism) take their loss, forward and backward, inside `loss_parallel`.
    """

    def __init__(
        self,
        model: nn.Module,
        precision,
        device: torch.device,
        *,
        pass_positions: bool = False,
        pass_segments: bool = False,
        vocab_parallel: bool = False,
        loss_fn: LossFn = masked_mean_loss,
    ):
        self.model = model
        self.precision = precision
        self.device = device
        self.pass_positions = pass_positions
        self.pass_segments = pass_segments
        self.vocab_parallel = vocab_parallel
        self.loss_fn = loss_fn

    def _logits(self, b: dict, **head) -> torch.Tensor:
        """The model's logits of a micro-batch already on the device (with head=False: the output layer's
        input), under the run's autocast."""
        with self.precision.autocast():
            return self.model(
                b["tokens"],
                position_ids=b.get("position_ids") if self.pass_positions else None,
                segment_ids=b.get("segment_ids") if self.pass_segments else None,
                **head,
            )

    def _head_weight(self) -> torch.Tensor | None:
        """The output layer's weight, when the loss function can apply it itself (its `with_head`, e.g.
        neox.train.loss.linear_masked_mean_loss) and it is a plain tensor (not a tensor-parallel or FSDP
        shard) of a plain head (model.head_weight())."""
        if getattr(self.loss_fn, "with_head", None) is None or self.vocab_parallel:
            return None
        head_weight = getattr(getattr(self.model, "module", self.model), "head_weight", None)  # under DDP
        weight = head_weight() if head_weight is not None else None
        return None if weight is None or isinstance(weight, DTensor) else weight

    def loss(self, batch: dict) -> torch.Tensor:
        """Masked-mean token cross entropy of one micro-batch."""
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        weight = self._head_weight()
        if weight is not None:
            x = self._logits(b, head=False)
            with self.precision.autocast():
                return self.loss_fn.with_head(x, weight, b["labels"], b["loss_mask"])
        logits = self._logits(b)
        # logits are a vocab-sharded DTensor under tensor parallelism: every loss function takes them (inside
        # loss_context); an objective's loss (neox.train.preference) also takes the batch entries it names
        extras = {k: b[k] for k in getattr(self.loss_fn, "batch_keys", ()) if k in b}
        return self.loss_fn(logits, b["labels"], b["loss_mask"], **extras)

    def forward_backward(self, micro_batches: list[dict], loss_scale: float = 1.0) -> torch.Tensor:
        n = len(micro_batches)
        set_aux_loss_scale(self.model, loss_scale / n)  # MoE aux losses: the token loss's factor
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, mb in enumerate(micro_batches):
            set_gradient_sync(self.model, i == n - 1)
            with loss_context(self.vocab_parallel):
                loss = self.loss(mb)
                (loss * (loss_scale / n)).backward()
            total += loss.detach()
        return total / n

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        with loss_context(self.vocab_parallel):
            return self.loss(batch).detach()

    @torch.no_grad()
    def eval_rows(self, batch: dict, fn: LossFn) -> torch.Tensor:
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        was = self.model.training
        self.model.eval()
        try:
            logits = self._logits(b)
            with loss_context(self.vocab_parallel):
                return fn(logits, b["labels"], b["loss_mask"]).float().cpu()
        finally:
            self.model.train(was)
