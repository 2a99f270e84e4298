"""Training throughput: neox's trainer step vs. Hugging Face GPTNeoXForCausalLM, same shape, batch and dtype.

    python bench/train.py                       # pythia-14m and pythia-70m shapes, fp32 and bf16, seq 512, micro 4
    python bench/train.py --models 14m --steps 2 --json out.json

Each case runs in its own process, so peak memory (peak RSS on CPU, max allocated on CUDA) is that case's.
Each process builds the model, takes warm-up steps, then times `--steps` optimizer steps and reports the
median: tokens/s, MFU (the model's training FLOPs per token against the matmul peak measured on this machine
in that dtype, neox.train.metrics.measure_peak_flops) and peak memory.

neox runs its real Trainer step (StepRunner forward/backward, gradient clipping, the default fused AdamW)
on a synthetic GPT-NeoX .bin/.idx dataset of random tokens. Hugging Face runs the usual loop: model(input_ids,
labels=...).loss, backward, clip_grad_norm_, torch.optim.AdamW; its bf16 is autocast over fp32 weights (what
`Trainer(bf16=True)` does) and, as a second row, the model cast to bf16 ("pure").

Machine load changes these numbers a lot on a shared CPU: the 1-minute load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"14m": "pythia-14m.yml", "70m": "pythia-70m.yml", "160m": "pythia-160m.yml"}
CASES = [  # (engine, precision label) in the order they run
    ("neox", "fp32"),
    ("hf", "fp32"),
    ("neox", "bf16-autocast"),
    ("neox", "bf16-pure"),
    ("hf", "bf16-autocast"),
    ("hf", "bf16-pure"),
]


def model_config(shape: str, seq: int, micro: int, precision: str):
    from neox.config import load

    prec, _, mode = precision.partition("-")
    sets = [
        f"seq_length={seq}",
        f"max_position_embeddings={seq}",
        f"train_micro_batch_size_per_gpu={micro}",
        "gradient_accumulation_steps=1",
        "train_batch_size=null",
        "checkpoint_activations=false",
        "zero_stage=0",
        "pipe_parallel_size=1",
        "model_parallel_size=1",
        f"precision={prec}",
        "tokenizer_type=ByteLevelTokenizer",
        "vocab_file=null",
        "merge_file=null",
        "device=auto",
    ]
    if mode:
        sets.append(f"bf16_mode={mode}")
    cfg = load([str(ROOT / "configs" / SHAPES[shape])], sets)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 50304  # Pythia's padded vocabulary
    return cfg


def synthetic_data(directory: str, vocab: int, tokens: int) -> str:
    import numpy as np

    from neox.data.indexed import IndexedDatasetBuilder

    prefix = os.path.join(directory, "random_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix, dtype=np.int32)
    for _ in range(tokens // 2048):
        builder.add_document(rng.integers(0, vocab, 2048))
    builder.finalize()
    return prefix


def run_neox(cfg, steps: int, warmup: int) -> list[float]:
    import torch

    from neox.train.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="neox-bench-")
    need = (steps + warmup + 2) * cfg.train.train_micro_batch_size_per_gpu * (cfg.model.seq_length + 1)
    cfg.data.data_path = synthetic_data(tmp, cfg.model.vocab_size, max(need * 2, 2048 * 16))
    cfg.data.split = "100,0,0"
    cfg.train.train_iters = steps + warmup
    cfg.checkpoint.save = cfg.checkpoint.load = cfg.logging.log_dir = None
    cfg.logging.use_wandb, cfg.logging.tensorboard_dir = False, None
    trainer = Trainer(cfg, quiet=True)
    data = trainer._loader(trainer.train_data, 0)
    times = []
    for i in range(steps + warmup):
        batch = trainer._next_step_batches(data)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_hf(cfg, steps: int, warmup: int, precision: str) -> list[float]:
    import contextlib

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = cfg.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = GPTNeoXConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size,
        rotary_pct=m.rotary_pct,
        rotary_emb_base=m.rotary_emb_base,
        max_position_embeddings=m.max_position_embeddings,
        use_parallel_residual=m.gpt_j_residual,
        tie_word_embeddings=not m.no_weight_tying,
        layer_norm_eps=m.layernorm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(hf_cfg).to(device)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()
    )
    b, t = cfg.train.train_micro_batch_size_per_gpu, m.seq_length
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + warmup):
        ids = torch.randint(0, m.vocab_size, (b, t + 1), generator=gen).to(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def one_case(args) -> dict:
    """Runs inside the child process: one engine, shape and precision."""
    import torch

    from neox.model import flops_per_token
    from neox.train.metrics import measure_peak_flops, peak_memory_bytes

    torch.set_num_threads(args.threads)
    cfg = model_config(args.case_shape, args.seq, args.micro, args.case_precision)
    if args.case_engine == "neox":
        times = run_neox(cfg, args.steps, args.warmup)
    else:
        times = run_hf(cfg, args.steps, args.warmup, args.case_precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.case_precision == "fp32" else torch.bfloat16
    tokens = args.micro * args.seq
    tps = tokens / statistics.median(times)
    peak = measure_peak_flops(device, dtype, torch.get_num_threads())
    return {
        "engine": args.case_engine,
        "shape": args.case_shape,
        "precision": args.case_precision,
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(cfg.model) / peak,
        "peak_flops": peak,
        "peak_mem_bytes": peak_memory_bytes(device),
        "step_times_s": times,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="14m,70m", help="comma-separated shapes: 14m, 70m, 160m")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (bf16 runs autocast and pure)")
    p.add_argument("--engines", default="neox,hf")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--case", nargs=3, metavar=("ENGINE", "SHAPE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:
        args.case_engine, args.case_shape, args.case_precision = args.case
        print(json.dumps(one_case(args)))
        return 0

    shapes = args.models.split(",")
    precisions = set(args.precisions.split(","))
    engines = set(args.engines.split(","))
    results = []
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs), threads {args.threads}")
    print(f"{'shape':>5} {'engine':>6} {'precision':>14} {'tokens/s':>9} {'MFU':>6} {'peak mem':>9}  load")
    for shape in shapes:
        for engine, precision in CASES:
            if engine not in engines or precision.split("-")[0] not in precisions:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--case",
                engine,
                shape,
                precision,
                "--seq",
                str(args.seq),
                "--micro",
                str(args.micro),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{shape:>5} {engine:>6} {precision:>14}  failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["load_avg"] = os.getloadavg()[0]
            results.append(r)
            print(
                f"{shape:>5} {engine:>6} {precision:>14} {r['tokens_per_s']:>9.0f} {100 * r['mfu']:>5.1f}% "
                f"{r['peak_mem_bytes'] / 2**30:>7.2f}GB  {r['load_avg']:.1f}",
                flush=True,
            )
    for shape in shapes:
        best = {
            e: max((r["tokens_per_s"] for r in results if r["shape"] == shape and r["engine"] == e), default=0)
            for e in ("neox", "hf")
        }
        if best["hf"] and best["neox"]:  # both engines ran
            print(
                f"{shape}: best neox {best['neox']:.0f} tok/s vs best HF {best['hf']:.0f} tok/s "
                f"= {best['neox'] / best['hf']:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
