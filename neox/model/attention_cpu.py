"""Attention as batched matmuls on a CPU, for the cases where SDPA's CPU flash kernel is slow in bf16/fp16.

That kernel works in small query/key tiles, and its reduced-precision path runs far below the matmul peak:
on a 2-core Zen 5 (2 threads, bf16) a decode step of 8 rows x 8 heads x 160 keys took 508 us, and causal
self-attention of 4 x 8 heads x 512 x 64 43 ms forward + backward. Here the same results come from large
matmuls, in the flash kernel's precision (fp32 scores and softmax; bf16 operands for the value products):

- few_queries: a decode step (a few query rows against a cache), 135 us for the case above.
- CausalBlocks: causal self-attention for training and prefill, in query blocks of BLOCK rows against the
  keys up to the block's end (skipping the masked upper triangle's blocks). It keeps q, k, v and the output
  for the backward pass, as the flash kernel does (no [T, T] tensor is kept), and recomputes each block's
  probabilities there: 32 ms for the case above, 44 vs 63 ms with 12 heads, 62 vs 92 ms with 16; a whole
  bf16 training step (alternating in one process, best of 4): pythia-70m 1,202 -> 1,082 ms, pythia-160m
  (2 rounds) 3,364 -> 2,823 ms.
fp32 inputs keep SDPA, whose fp32 path is as fast. So does a CPU with AMX for the dtype (Sapphire Rapids and
later for bf16, neox.kernels.cpu_isa), where the flash kernel's tiles go through AMX: on a 2-core Xeon with
amx_bf16 (2 threads, bf16) SDPA took 26 ms for the causal case above against CausalBlocks' 33 ms, and 73 us
for the decode step against few_queries' 265 us.
"""

from __future__ import annotations

import torch

from neox.kernels.cpu_isa import onednn_has_amx

LOW_PRECISION = (torch.bfloat16, torch.float16)
BLOCK = 128  # query rows per block of CausalBlocks: its fp32 scores against 512 keys are 256 KiB per head
# A decode step: up to FEW_QUERIES query rows, no gradient, and up to FEW_KEYS_ELEMENTS cache elements per
# call (the fp32 copies of a larger cache cost more than they save; 512 keys: 1434 -> 321 us).
FEW_QUERIES = 4
FEW_KEYS_ELEMENTS = 1 << 22


def _low_precision_cpu(q, dropout: float) -> bool:
    return q.device.type == "cpu" and q.dtype in LOW_PRECISION and not dropout and not onednn_has_amx(q.dtype)


def decoding_on_cpu(q, k, dropout: float) -> bool:
    """Whether attention of q against the cache k is a decode step for few_queries."""
    return (
        (type(q) is torch.Tensor or torch.compiler.is_compiling())  # not a DTensor shard
        and _low_precision_cpu(q, dropout)
        and q.shape[2] <= FEW_QUERIES
        and k.numel() <= FEW_KEYS_ELEMENTS
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    )


def few_queries(q, k, v, mask) -> torch.Tensor:
    """SDPA's result (default scale, grouped-query heads, a bool or additive mask, 0 for a row with no key
    allowed) as fp32 matmuls, the precision the flash kernel computes in; the output in q's dtype."""
    b, h, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    group = h // kv_heads  # query head i reads kv head i // group, as SDPA's enable_gqa
    q32 = q.reshape(b, kv_heads, group * t, d).float()
    scores = (q32 @ k.float().transpose(-1, -2)).mul_(d**-0.5).view(b, h, t, s)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    p = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    out = p.view(b, kv_heads, group * t, s) @ v.float()
    return out.view(b, h, t, d).to(q.dtype)


def causal_on_cpu(q, k, dropout: float) -> bool:
    """Whether causal self-attention of q, k (same length, same heads) takes CausalBlocks."""
    return (
        type(q) is torch.Tensor  # not a DTensor shard (tensor parallelism): SDPA
        and not torch.compiler.is_compiling()  # a compiled region keeps SDPA for the compiler to choose
        and _low_precision_cpu(q, dropout)
        and q.shape == k.shape
        and q.shape[2] > FEW_QUERIES
    )


def _probabilities(q, k, start: int, stop: int, scale: float) -> torch.Tensor:
    """Softmax probabilities (fp32) of queries [start, stop) over keys [0, stop), causal, from fp32 q, k."""
    scores = torch.matmul(q[:, :, start:stop], k[:, :, :stop].transpose(-1, -2)).mul_(scale)
    rows = stop - start
    if rows > 1:  # the diagonal block: query start + i sees keys up to start + i
        upper = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., start:stop].masked_fill_(upper, float("-inf"))
    return torch.softmax(scores, dim=-1, out=scores)


class CausalBlocks(torch.autograd.Function):
    """softmax(q k^T / sqrt(d), causal) v for q, k, v [B, H, T, D] in bf16/fp16 (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v):
        # the model's q, k, v are strided views of one projection: each block's matmuls would copy them
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        t, scale = q.shape[2], q.shape[3] ** -0.5
        out = torch.empty_like(q)
        q32, k32 = q.float(), k.float()
        for start in range(0, t, BLOCK):
            stop = min(t, start + BLOCK)
            p = _probabilities(q32, k32, start, stop, scale)
            torch.matmul(p.to(v.dtype), v[:, :, :stop], out=out[:, :, start:stop])
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        t, scale = q.shape[2], q.shape[3] ** -0.5
        q32, k32 = q.float(), k.float()
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        # softmax's backward: ds = p * (dp - rowsum(dout * out))
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        for start in range(0, t, BLOCK):
            stop = min(t, start + BLOCK)
            p = _probabilities(q32, k32, start, stop, scale)
            g = grad_out[:, :, start:stop]
            dv[:, :, :stop].add_(torch.matmul(p.to(v.dtype).transpose(-1, -2), g))
            dp = torch.matmul(g, v[:, :, :stop].transpose(-1, -2))
            ds = dp.sub(delta[:, :, start:stop]).mul_(p).mul_(scale).to(q.dtype)
            torch.matmul(ds, k[:, :, :stop], out=dq[:, :, start:stop])
            dk[:, :, :stop].add_(torch.matmul(ds.transpose(-1, -2), q[:, :, start:stop]))
        return dq, dk.to(k.dtype), dv.to(v.dtype)
