"""The training loss: masked-mean token cross entropy, computed in row chunks to spare memory traffic.

F.cross_entropy over [tokens, vocab] logits writes a full log-softmax copy in the forward pass and, in the
backward pass, a zero-filled gradient of the same size that log_softmax_backward then reads and rewrites: at
Pythia's 50k vocabulary and 2048 tokens that is ~0.4 GB per pass, and on a CPU it costs more time than the
output layer's matmul. Here each chunk of rows goes through one softmax, which gives both the log-sum-exp
(from the largest probability) and the gradient, softmax - onehot: when the logits need a gradient it is
written into their own storage in the forward pass, while the chunk is in cache, and the backward pass only
multiplies it by the loss's factor (the output layer's backward needs its inputs, not its output, so nothing
else reads the logits afterwards; anything that did would fail loudly, as the write bumps their version).
fp16 logits keep the gradient to the backward pass, where the loss scale reaches it before it could
underflow. Each pass works in one fp32 chunk buffer, in place: a fresh temporary per operation is fresh
memory, and on a CPU each of its pages costs a fault. On a 2-core Zen 5 VM (2 threads) a [2048, 50304] bf16
loss took 148 ms forward + backward with two exp passes, 48-62 ms with the one softmax.

Where the model's head is a plain matmul (no tensor parallelism, no adapter on it), the training runner hands
this module the head's input and weight instead of the logits (`linear_masked_mean_loss`): then even that
scaling pass goes, as the loss's factor can scale the [tokens, hidden] side of the output layer's backward
instead of the [tokens, vocab] one (a [2048, 50304] bf16 multiply took 47 ms on a 2-core Xeon with AMX, about
5% of a pythia-70m step; its whole step went 877-910 -> 790-809 ms forward + backward).

The chunk size depends on the device (`chunk_rows`). A CPU wants chunks that fit its last-level cache. A GPU
wants the opposite: every chunk costs a handful of kernel launches, and cache-sized chunks of a 50k vocabulary
are ~80 rows, ~1,000 tiny kernels per micro-batch; there the chunks only bound the fp32 temporaries
(logsumexp's and the gradient's), so a micro-batch's logits usually go in one to four chunks.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from neox.kernels.bf16_cpu import cpu_lacks_bf16
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


def _lse_and_gradient(logits: torch.Tensor, safe: torch.Tensor, weights: torch.Tensor, gradient: bool):
    """Per-row log-sum-exp of `logits` [N, V] (fp32 [N]), chunk by chunk; with `gradient`, each chunk's
    (softmax - onehot(safe)) * weights is written over its logits while the chunk is in cache."""
    n, v = logits.shape
    rows = chunk_rows(v, logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    buf = torch.empty(min(rows, n), v, dtype=torch.float32, device=logits.device)
    for s in range(0, n, rows):
        chunk = logits[s : s + rows]
        z = buf[: chunk.shape[0]].copy_(chunk)
        top = z.amax(dim=1)
        p = torch.softmax(z, dim=1, out=z)
        # the largest probability is exp(0) / sum exp(z - top): lse = top - log(max p), and max p >= 1 / V
        # cannot underflow as the label's probability could
        lse[s : s + rows] = top - p.amax(dim=1).log()
        if gradient:
            _softmax_to_gradient(p, safe[s : s + rows], weights[s : s + rows], chunk)
    return lse


class _MaskedMeanCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # logits [N, V]; labels [N] (any value where weights is 0); weights [N] fp32, summing to 1
        v = logits.shape[1]
        safe = labels.clamp(0, v - 1).unsqueeze(1)
        picked = logits.gather(1, safe).squeeze(1).float()
        # fp16 gradients would underflow before the loss scale reaches them: those are made in backward
        early = ctx.needs_input_grad[0] and logits.dtype != torch.float16
        lse = _lse_and_gradient(logits, safe, weights, early)
        ctx.early = early
        ctx.logits = logits  # not save_for_backward: the gradient in it bumps its version (see increment_version)
        if early:
            # anything else that saved the logits for its backward must fail loudly, not read a gradient
            torch.autograd.graph.increment_version(logits)
        else:
            ctx.save_for_backward(safe, weights, lse)
        ctx.rows = chunk_rows(v, logits.device)
        return ((lse - picked) * weights).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits = ctx.logits
        del ctx.logits
        if ctx.early:
            # the unscaled loss's gradient is already in the logits: scale it by the loss's factor (x * 1 is
            # exact; one read pass, and no host read of the factor, which would be a sync on an accelerator)
            return logits.mul_(grad), None, None
        safe, weights, lse = ctx.saved_tensors
        scale = weights * grad
        rows, n = ctx.rows, logits.shape[0]
        buf = torch.empty(min(rows, n), logits.shape[1], dtype=torch.float32, device=logits.device)
        for s in range(0, n, rows):
            chunk = logits[s : s + rows]
            p = buf[: chunk.shape[0]].copy_(chunk).sub_(lse[s : s + rows, None]).exp_()
            _softmax_to_gradient(p, safe[s : s + rows], scale[s : s + rows], chunk)
        return logits, None, None


class _LinearMaskedMeanCrossEntropy(torch.autograd.Function):
    """The output layer and the loss as one autograd node: logits = x @ weight^T are this node's own
    temporary, so the loss's gradient written into them needs no scaling pass over [N, V] in the backward
    pass; the loss's factor scales the output layer's input gradient [N, H] and its input x instead (the
    same products as the separate layers when the factor is 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
        # x [N, H] and weight [V, H] in the compute dtype (not fp16); labels, weights as _MaskedMeanCrossEntropy
        logits = torch.mm(x, weight.t())
        safe = labels.clamp(0, weight.shape[0] - 1).unsqueeze(1)
        picked = logits.gather(1, safe).squeeze(1).float()
        gradient = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        lse = _lse_and_gradient(logits, safe, weights, gradient)
        if gradient:
            ctx.save_for_backward(x, weight, logits)
        return ((lse - picked) * weights).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, gradient = ctx.saved_tensors
        grad_x = torch.mm(gradient, weight).mul_(grad) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(gradient.t(), x * grad) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None


def _softmax_to_gradient(p: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """(softmax - onehot) * scale per row, from fp32 probabilities `p` (overwritten) into `out` (the logits)."""
    p.scatter_add_(1, labels, torch.full_like(p[:, :1], -1.0))
    p.mul_(scale[:, None])
    out.copy_(p)


def _weights(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    keep = loss_mask.reshape(-1).to(torch.float32) * (labels.reshape(-1) >= 0)
    return keep / keep.sum().clamp(min=1.0)


def masked_mean_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the tokens `loss_mask` keeps (and labels != -100), GPT-NeoX's per-micro-batch
    normalisation. `logits` [B, T, V] must be a temporary of this loss: its storage is reused for the
    gradient in the backward pass. Vocab-sharded logits (a DTensor, tensor parallelism; inside
    neox.parallel.loss_context) take the parallel cross entropy, which reduces the softmax over the shards."""
    if isinstance(logits, DTensor):
        return sharded_masked_mean_loss(logits, labels, loss_mask)
    flat = logits.reshape(-1, logits.shape[-1])
    return _MaskedMeanCrossEntropy.apply(flat, labels.reshape(-1), _weights(labels, loss_mask))


def linear_masked_mean_loss(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """masked_mean_loss(F.linear(x, weight), labels, loss_mask) for a bias-free output layer `weight` [V, H]
    applied to x [B, T, H] here, in the dtype F.linear would run in (the autocast dtype inside autocast), as
    one autograd node (_LinearMaskedMeanCrossEntropy). fp16 keeps the separate layers (its gradient is made
    in the backward pass, after the loss scale), and so does bf16 on a CPU without bf16 arithmetic (where
    F.linear takes neox.kernels.bf16_cpu's fp32-block matmul)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(x.dtype, weight.dtype)
    if dtype == torch.float16 or (dtype == torch.bfloat16 and device == "cpu" and cpu_lacks_bf16()):
        return masked_mean_loss(torch.nn.functional.linear(x, weight), labels, loss_mask)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    with torch.autocast(device, enabled=False):
        return _LinearMaskedMeanCrossEntropy.apply(
            flat, weight.to(dtype), labels.reshape(-1), _weights(labels, loss_mask)
        )


# the runner (neox.parallel.runner) computes the output layer here when the model's head is a plain matmul
masked_mean_loss.with_head = linear_masked_mean_loss
