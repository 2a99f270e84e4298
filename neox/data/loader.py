"""Micro-batches for the trainer: GPT-NeoX's data-parallel slicing and its masks and position ids.

Micro-step j reads the ``micro_batch * dp_size`` consecutive samples starting at
``start_sample + j * micro_batch * dp_size``; data-parallel rank r takes the r-th ``micro_batch`` of them
(GPT-NeoX's ``DistributedBatchSampler``). So an optimizer step of ``accum`` micro-steps consumes
``global_batch = micro * accum * dp`` consecutive samples whatever the layout, and a run resumed after k
optimizer steps passes ``start_sample = k * global_batch``.

With ``loop`` the indices run on past the dataset's end and the dataset maps them, as GPT-NeoX's training
loader relies on: ``GPT2Dataset`` serves every sample it built (one more than its ``len``) and takes any
later index modulo its length, ``BlendableDataset`` takes it modulo its size. So a run never runs out of
data, and the order is GPT-NeoX's up to the last sample.

Each batch is a dict of tensors (T = seq_length):

``tokens``       int64 [b, T]   sample[:-1] (padding replaced by 0)
``labels``       int64 [b, T]   sample[1:], or the label dataset's [1:]; -100 where there is no target
``loss_mask``    float [b, T]   1 where the loss counts: 0 at -100 labels, and at EOD inputs if eod_mask_loss
``position_ids`` int64 [b, T]   (reset_position_ids only) 0..T-1, restarting after every EOD; without it the
                                model counts 0..T-1 itself (the runner passes position ids only then)
``segment_ids``  int64 [b, T]   (reset_attention_mask only) document number within the row, for
                                block-diagonal causal attention; the EOD belongs to the document it ends

With ``pin_memory`` (training on a GPU) every tensor is in page-locked memory, so the runner's
``.to(device, non_blocking=True)`` copies overlap the previous step's kernels instead of waiting for them.

EOD handling is GPT-NeoX's ``get_ltor_masks_and_position_ids``. Items that carry a ``"segment"`` array
(``GPT2Dataset(return_segments=True)``) use those document boundaries instead of EOD tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch


def micro_batch_indices(
    num_samples: int, micro_batch: int, dp_rank: int, dp_size: int, start_sample: int = 0, loop: bool = False
) -> Iterator[np.ndarray]:
    """Sample indices of this rank's micro-batches, in order.

    Stops before the first global micro-batch that would run past ``num_samples`` (every rank yields the
    same number of batches); with ``loop`` it never stops and leaves wrapping to the dataset (see the
    module docstring).
    """
    if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad layout: micro_batch={micro_batch}, dp_rank={dp_rank}, dp_size={dp_size}")
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    step = micro_batch * dp_size
    base = start_sample
    mine = np.arange(dp_rank * micro_batch, (dp_rank + 1) * micro_batch, dtype=np.int64)
    while True:
        if not loop and base + step > num_samples:
            return
        idx = base + mine
        yield idx
        base += step


def _segments_from_eod(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    eod = (tokens == eod_id).to(torch.int64)
    return torch.cumsum(eod, dim=1) - eod  # EODs strictly before each position


def _positions_from_segments(segments: torch.Tensor) -> torch.Tensor:
    b, t = segments.shape
    pos = torch.arange(t, dtype=torch.int64).expand(b, t)
    starts = torch.zeros_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    # Each position minus the start of its segment: running max of the start indices seen so far.
    return pos - torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values


def collate(
    items: list[dict],
    eod_id: int | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> dict[str, torch.Tensor]:
    """Turn dataset items (``{"text": int64[T+1], ...}``) into the trainer's batch dict."""
    has_segments = "segment" in items[0]
    if eod_id is None and (eod_mask_loss or ((reset_position_ids or reset_attention_mask) and not has_segments)):
        raise ValueError(
            "eod_id is needed for eod_mask_loss, and for reset_position_ids / reset_attention_mask "
            "unless the dataset returns segments"
        )
    text = torch.from_numpy(np.stack([np.asarray(it["text"], dtype=np.int64) for it in items]))
    raw_tokens = text[:, :-1]
    if "label" in items[0]:
        target = torch.from_numpy(np.stack([np.asarray(it["label"], dtype=np.int64) for it in items]))[:, 1:]
    else:
        target = text[:, 1:]
    valid = target >= 0
    labels = torch.where(valid, target, torch.full_like(target, -100)).contiguous()
    tokens = torch.where(raw_tokens >= 0, raw_tokens, torch.zeros_like(raw_tokens)).contiguous()
    loss_mask = valid.to(torch.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod_id] = 0.0
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}

    segments = None
    if reset_position_ids or reset_attention_mask:
        if has_segments:
            segments = torch.from_numpy(np.stack([np.asarray(it["segment"], dtype=np.int64) for it in items]))
            segments = segments[:, :-1].contiguous()
        else:
            segments = _segments_from_eod(tokens, eod_id)
    if reset_position_ids:
        batch["position_ids"] = _positions_from_segments(segments)
    if reset_attention_mask:
        batch["segment_ids"] = segments
    return batch


class _IndexBatches:
    """A re-iterable batch sampler for torch's DataLoader (worker processes)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __iter__(self):
        return (idx.tolist() for idx in micro_batch_indices(**self.kwargs))


def batches(
    dataset,
    micro_batch: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    start_sample: int = 0,
    *,
    eod_id: int | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    num_workers: int = 0,
    loop: bool = False,
    pin_memory: bool = False,
) -> Iterator[dict]:
    """Yield this data-parallel rank's micro-batches from ``start_sample`` on (see the module docstring).

    ``num_workers`` > 0 reads and collates in that many worker processes (torch DataLoader); the batches and
    their order are the same. ``loop`` (training, repeated evaluation) never stops: the dataset must accept
    any index, as ``GPT2Dataset`` and ``BlendableDataset`` do by wrapping. ``pin_memory`` page-locks the
    batches (only when a CUDA device will take them: pinning needs one).
    """
    make = partial(
        collate,
        eod_id=eod_id,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
    )
    index_args = dict(
        num_samples=len(dataset),
        micro_batch=micro_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        start_sample=start_sample,
        loop=loop,
    )
    if num_workers <= 0:
        for idx in micro_batch_indices(**index_args):
            batch = make([dataset[int(i)] for i in idx])
            yield {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_IndexBatches(**index_args),
        num_workers=num_workers,
        collate_fn=make,
        pin_memory=pin_memory,
    )
    yield from loader
