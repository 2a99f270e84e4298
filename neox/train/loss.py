"""The training loss: masked-mean token cross entropy, computed in row chunks to spare memory traffic.

F.cross_entropy over [tokens, vocab] logits writes a full log-softmax copy in the forward pass and, in the
backward pass, a zero-filled gradient of the same size that log_softmax_backward then reads and rewrites: at
Pythia's 50k vocabulary and 2048 tokens that is ~0.4 GB per pass, and on a CPU it costs more time than the
output layer's matmul. Here the forward keeps only one log-sum-exp per token, and the backward writes
softmax - onehot straight into the logits' own storage, chunk by chunk while each chunk is in cache (the
output layer's backward needs its inputs, not its output, so nothing else reads the logits afterwards). Each
pass works in one fp32 chunk buffer, in place: a fresh temporary per operation is fresh memory, and on a CPU
each of its pages costs a fault (a [1024, 8192] bf16 loss took 74 ms with temporaries, 48 ms with the buffer,
on a 2-core EPYC VM).

The chunk size depends on the device (`chunk_rows`). A CPU wants chunks that fit its last-level cache. A GPU
wants the opposite: every chunk costs a handful of kernel launches, and cache-sized chunks of a 50k vocabulary
are ~80 rows, ~1,000 tiny kernels per micro-batch; there the chunks only bound the fp32 temporaries
(logsumexp's and the gradient's), so a micro-batch's logits usually go in one to four chunks.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from neox.parallel.reduce import masked_mean_loss as sharded_masked_mean_loss

# Logits per chunk on a CPU: about 4M (16 MB in fp32), small enough to stay in the last-level cache.
CHUNK_ELEMENTS = 1 << 22
# Logits per chunk on an accelerator: 256M (1 GiB per fp32 temporary), a memory bound, not a cache one; at
# Pythia's 50k vocabulary that is ~5,300 tokens per chunk.
DEVICE_CHUNK_ELEMENTS = 1 << 28


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows (tokens) of [tokens, vocab] logits the loss processes at once on `device` (see module docstring)."""
    elements = CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(1, elements // vocab)


class _MaskedMeanCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # logits [N, V]; labels [N] (any value where weights is 0); weights [N] fp32, summing to 1
        n, v = logits.shape
        rows = chunk_rows(v, logits.device)
        safe = labels.clamp(0, v - 1).unsqueeze(1)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        picked = logits.gather(1, safe).squeeze(1).float()
        buf = torch.empty(min(rows, n), v, dtype=torch.float32, device=logits.device)
        for s in range(0, n, rows):
            chunk = buf[: min(rows, n - s)].copy_(logits[s : s + rows])
            top = chunk.amax(dim=1, keepdim=True)
            top.masked_fill_(top.isinf(), 0.0)  # a row of -inf logits: lse -inf, as torch.logsumexp gives
            lse[s : s + rows] = chunk.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
        ctx.save_for_backward(logits, safe, weights, lse)
        ctx.rows = rows
        return ((lse - picked) * weights).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, safe, weights, lse = ctx.saved_tensors
        scale = weights * grad  # d loss / d (token loss)
        rows, n = ctx.rows, logits.shape[0]
        buf = torch.empty(min(rows, n), logits.shape[1], dtype=torch.float32, device=logits.device)
        for s in range(0, n, rows):
            chunk = logits[s : s + rows]
            g = buf[: chunk.shape[0]].copy_(chunk).sub_(lse[s : s + rows, None]).exp_()
            g.scatter_add_(1, safe[s : s + rows], torch.full_like(g[:, :1], -1.0))
            g.mul_(scale[s : s + rows, None])
            chunk.copy_(g)  # the gradient overwrites the logits in place
        return logits, None, None


def masked_mean_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the tokens `loss_mask` keeps (and labels != -100), GPT-NeoX's per-micro-batch
    normalisation. `logits` [B, T, V] must be a temporary of this loss: its storage is reused for the
    gradient in the backward pass. Vocab-sharded logits (a DTensor, tensor parallelism; inside
    neox.parallel.loss_context) take the parallel cross entropy, which reduces the softmax over the shards."""
    if isinstance(logits, DTensor):
        return sharded_masked_mean_loss(logits, labels, loss_mask)
    flat = logits.reshape(-1, logits.shape[-1])
    keep = loss_mask.reshape(-1).to(torch.float32) * (labels.reshape(-1) >= 0)
    weights = keep / keep.sum().clamp(min=1.0)
    return _MaskedMeanCrossEntropy.apply(flat, labels.reshape(-1), weights)
