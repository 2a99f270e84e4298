"""MoE training throughput: an 8-expert top-2 neox model vs. a dense neox model with the same active
parameters vs. transformers' MixtralForCausalLM of the same shape.

    python bench/moe.py                          # 4 blocks, hidden 256, experts of width 704, seq 256, micro 4
    python bench/moe.py --dispatch padded --json out.json

Each case runs in its own process. neox runs its Trainer step (runner forward/backward with the aux loss,
clipping, AdamW) on a synthetic .bin/.idx dataset of random tokens; the dense model's MLP is as wide as the
two experts a token runs through (2 x 704), so its FLOPs per token are the MoE model's less the router's.
transformers runs model(input_ids, labels).loss with its own balancing loss (output_router_logits), backward,
clip_grad_norm_, torch.optim.AdamW. fp32 on the CPU (bf16 adds nothing to the comparison there).
Machine load changes these numbers a lot on a shared CPU: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("neox-moe", "neox-dense", "hf-mixtral")


def model_group(args, moe: bool) -> dict:
    group = dict(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        seq_length=args.seq,
        vocab_size=args.vocab,
        norm="rmsnorm",
        activation="swiglu",
        use_bias_in_attn_linear=False,
        use_bias_in_mlp=False,
        use_bias_in_norms=False,
        no_weight_tying=True,
        intermediate_size=args.expert_width if moe else args.top_k * args.expert_width,
    )
    if moe:
        group.update(
            moe_num_experts=args.experts,
            moe_top_k=args.top_k,
            moe_router_type="topk",
            moe_topk_renormalize=True,
            moe_aux_loss_coeff=0.01,
            moe_dispatch=args.dispatch,
        )
    return group


def synthetic_data(directory: str, vocab: int, tokens: int) -> str:
    """A GPT-NeoX .bin/.idx dataset of random tokens in 2048-token documents; returns its prefix."""
    import numpy as np

    from neox.data.indexed import IndexedDatasetBuilder

    prefix = os.path.join(directory, "random_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix, dtype=np.int32)
    for _ in range(tokens // 2048):
        builder.add_document(rng.integers(0, vocab, 2048))
    builder.finalize()
    return prefix


def run_neox(args, moe: bool) -> tuple[list[float], int]:
    import tempfile

    from neox.config import from_dict
    from neox.model import flops_per_token
    from neox.train.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="neox-moe-bench-")
    steps = args.steps + args.warmup
    data = synthetic_data(tmp, args.vocab, max(2 * (steps + 2) * args.micro * (args.seq + 1), 2048 * 16))
    cfg = from_dict(
        {
            "model": model_group(args, moe),
            "tokenizer": {"tokenizer_type": "ByteLevelTokenizer"},
            "data": {"data_path": data, "split": "100,0,0"},
            "train": {"train_iters": steps, "train_micro_batch_size_per_gpu": args.micro, "device": "cpu"},
            "logging": {"progress_bar": False},
            "eval": {"eval_iters": 0},
        }
    )
    trainer = Trainer(cfg, quiet=True)
    it = trainer._loader(trainer.train_data, 0)
    times = []
    for i in range(steps):
        batch = trainer._next_step_batches(it)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times, flops_per_token(cfg.model)


def run_hf(args) -> tuple[list[float], int]:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from neox.config import from_dict
    from neox.model import flops_per_token

    conf = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=0.01 / args.top_k,
    )
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MixtralForCausalLM(conf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.steps + args.warmup):
        ids = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times, flops_per_token(from_dict({"model": model_group(args, True)}).model)


def one_case(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.case == "hf-mixtral":
        times, fpt = run_hf(args)
    else:
        times, fpt = run_neox(args, moe=args.case == "neox-moe")
    tps = args.micro * args.seq / statistics.median(times)
    return {"case": args.case, "tokens_per_s": tps, "flops_per_token": fpt, "step_times_s": times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=704)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--dispatch", default="grouped_mm", choices=("grouped_mm", "padded"))
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(one_case(args)))
        return 0

    passed = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs), threads {args.threads}")
    results = []
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, *passed, "--case", case], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{case:>11}  failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["load_avg"] = os.getloadavg()[0]
        results.append(r)
        print(
            f"{case:>11} {r['tokens_per_s']:>9.0f} tok/s  {r['flops_per_token'] / 1e6:.1f} MFLOP/token  load {r['load_avg']:.1f}"
        )
    by = {r["case"]: r["tokens_per_s"] for r in results}
    if "neox-moe" in by and "hf-mixtral" in by:
        print(f"neox MoE vs transformers Mixtral: {by['neox-moe'] / by['hf-mixtral']:.2f}x")
    if "neox-moe" in by and "neox-dense" in by:
        print(f"neox MoE vs neox dense (same active parameters): {by['neox-moe'] / by['neox-dense']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
