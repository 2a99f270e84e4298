"""Activation memory and step time of each activation-checkpointing granularity (train.checkpoint_activations).

    python bench/activation_checkpointing.py                   # 8 blocks, hidden 512, seq 512, batch 4, fp32
    python bench/activation_checkpointing.py --layers 4 --hidden 256 --seq 256

One forward + backward per granularity on the same weights and batch, in one process. Memory is read from
torch.profiler's allocator events (profile_memory=True: every allocation and free with its size and time):
the running sum of those events from the start of the forward gives "kept after forward" (what the backward
pass will need: activations, or checkpoint inputs) and "peak" (its maximum over forward and backward, the
gradients included). The weights, allocated before, are not counted. Time: the median of --repeats
unprofiled forward + backward passes.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from neox.config.schema import ModelConfig, TrainConfig
from neox.model import GPT
from neox.parallel import activation_checkpoint

BACKWARD = "bench_backward"
MODES = [
    ("none", None, 1),
    ("full", "full", 1),
    ("full, 2 blocks per checkpoint", "full", 2),
    ("full, 4 blocks per checkpoint", "full", 4),
    ("selective_attention", "selective_attention", 1),
    ("selective_op", "selective_op", 1),
]


def step(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def measure(model: GPT, tokens: torch.Tensor) -> tuple[int, int]:
    """(bytes kept after the forward, peak bytes over forward + backward), above what was allocated before."""
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step(model, tokens)
        with record_function(BACKWARD):  # marks where the forward ends, on the profiler's own clock
            loss.backward()
    everything = prof.profiler.kineto_results.events()
    boundary = min(e.start_ns() for e in everything if e.name() == BACKWARD)
    events = sorted((e for e in everything if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = kept = 0
    for e in events:
        if e.start_ns() > boundary and not kept:
            kept = current
        current += e.nbytes()
        peak = max(peak, current)
    return kept, peak


def seconds(model: GPT, tokens: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step(model, tokens).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        seq_length=args.seq,
        vocab_size=args.vocab,
    )
    torch.manual_seed(0)
    base = GPT(cfg)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    params = sum(p.numel() for p in base.parameters())
    print(
        f"GPT {args.layers} x {args.hidden} ({params / 1e6:.1f}M parameters), batch {args.batch} x {args.seq} "
        f"tokens, fp32, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print("| checkpointing | kept after forward | peak (fwd + bwd) | fwd + bwd time |")
    print("|---|---:|---:|---:|")
    rows = []
    for label, kind, n in MODES:
        train = (
            TrainConfig()
            if kind is None
            else TrainConfig(checkpoint_activations=True, checkpoint_granularity=kind, checkpoint_num_layers=n)
        )
        model = activation_checkpoint.apply(copy.deepcopy(base), train)
        kept, peak = measure(model, tokens)
        t = seconds(model, tokens, args.repeats)
        rows.append((label, kept, peak, t))
        ref = rows[0]
        print(
            f"| {label} | {kept / 2**20:,.0f} MiB ({kept / ref[1]:.0%}) | {peak / 2**20:,.0f} MiB ({peak / ref[2]:.0%}) "
            f"| {t:.2f} s ({t / ref[3]:.2f}x) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
