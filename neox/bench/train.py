"""One training measurement: neox's Trainer step or Hugging Face GPTNeoXForCausalLM's loop, same shape.

neox runs its real Trainer step (StepRunner forward/backward, gradient clipping, the default fused AdamW) on
a synthetic GPT-NeoX .bin/.idx dataset of random tokens. Hugging Face runs the usual loop: model(input_ids,
labels=...).loss, backward, clip_grad_norm_, torch.optim.AdamW; its bf16 is autocast over fp32 weights (what
`Trainer(bf16=True)` does) or, with precision "bf16-pure", the model cast to bf16.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from neox.config import from_dict
from neox.config.schema import Config
from neox.data.indexed import IndexedDatasetBuilder
from neox.interop.hf_mapping import to_hf_config
from neox.model import flops_per_token
from neox.train.metrics import peak_memory_bytes
from neox.train.trainer import Trainer

# Pythia's published sizes (EleutherAI/pythia models/*.yml): layers, width, heads
PYTHIA_SHAPES = {
    "14m": (6, 128, 4),
    "70m": (6, 512, 8),
    "160m": (12, 768, 12),
    "410m": (24, 1024, 16),
}
PYTHIA_LAYOUT = dict(
    pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, norm="layernorm", vocab_size=50304
)


def pythia_config(shape: str, seq: int, micro: int, precision: str, device: str = "auto") -> Config:
    """A Pythia-shaped training config (random tokens; no checkpoints, logs or activation checkpointing)."""
    layers, hidden, heads = PYTHIA_SHAPES[shape]
    prec, _, mode = precision.partition("-")
    model = dict(
        PYTHIA_LAYOUT,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        seq_length=seq,
        max_position_embeddings=seq,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    precision_section = {"precision": prec, **({"bf16_mode": mode} if mode else {})}
    return from_dict(
        {
            "model": model,
            "train": dict(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, device=device),
            "precision": precision_section,
            "tokenizer": {"tokenizer_type": "ByteLevelTokenizer"},
        }
    )


def synthetic_data(directory: str, vocab: int, tokens: int) -> str:
    prefix = os.path.join(directory, "random_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix, dtype=np.int32)
    for _ in range(max(tokens // 2048, 1)):
        builder.add_document(rng.integers(0, vocab, 2048))
    builder.finalize()
    return prefix


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_neox(cfg: Config, steps: int, warmup: int, on_first_step=None) -> list[float]:
    """Seconds of each timed Trainer step (after `warmup` untimed ones); `on_first_step()` after step one.
    The synthetic dataset lives in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="neox-bench-") as tmp:
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
            _sync(trainer.device)
            if i == 0 and on_first_step is not None:
                on_first_step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return times


def hf_model(cfg: Config, device: str):
    """transformers' GPTNeoXForCausalLM of the same shape (its own random init), SDPA attention."""
    from transformers import GPTNeoXForCausalLM

    hf_cfg = to_hf_config(cfg.model)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(hf_cfg).to(device)


def run_hf(cfg: Config, steps: int, warmup: int, precision: str, on_first_step=None) -> list[float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(cfg, device)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()
    )
    b, t, vocab = cfg.train.train_micro_batch_size_per_gpu, cfg.model.seq_length, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + warmup):
        ids = torch.randint(0, vocab, (b, t + 1), generator=gen).to(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i == 0 and on_first_step is not None:
            on_first_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def train_case(
    engine: str,
    shape: str,
    precision: str,
    seq: int,
    micro: int,
    steps: int,
    warmup: int,
    launched_at: float | None = None,
) -> dict:
    """One engine's figures for one shape: median step tokens/s, peak memory, time to the first step's end
    (from `launched_at`, the parent's wall clock when it started this process, so it includes start-up)."""
    cfg = pythia_config(shape, seq, micro, precision)
    first: list[float] = []

    def mark():
        first.append(time.time())

    if engine == "neox":
        times = run_neox(cfg, steps, warmup, mark)
    elif engine == "hf":
        times = run_hf(cfg, steps, warmup, precision, mark)
    else:
        raise ValueError(f"train: unknown engine {engine!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tps = micro * seq / statistics.median(times)
    return {
        "tokens_per_s": tps,
        "flops_per_token": flops_per_token(cfg.model),
        "peak_mem_bytes": peak_memory_bytes(device),
        "first_step_s": first[0] - launched_at if launched_at is not None else None,
        "step_times_s": times,
        "threads": torch.get_num_threads(),
    }
