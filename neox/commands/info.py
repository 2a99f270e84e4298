"""`neox info CONFIG... [--set KEY=VALUE]`: parameter count, FLOPs per token and per-rank memory estimates.

Pure arithmetic on the config (neox.model.info): nothing is allocated, so it answers for a 20B model at once.
"""

from __future__ import annotations

import argparse
import json

from neox.commands.common import add_config_args
from neox.config import load, resolve_batch, resolve_vocab
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError, NeoxError
from neox.model import info
from neox.parallel.mesh import ParallelDims


def register(parser: argparse.ArgumentParser, name: str) -> None:
    add_config_args(parser)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="N",
        help="the tokenizer's vocabulary size, when model.vocab_size is unset and the tokenizer "
        "file is not at hand (padded as in training)",
    )
    parser.add_argument(
        "--dp",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel size for the memory estimate (ZeRO shards over it)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="total processes (world size): checks the config's parallel layout for N processes "
        "and takes the data-parallel size from it (N / (pipe * model parallel))",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def _resolve_vocab(cfg, vocab_size: int | None) -> None:
    tp = cfg.parallel.model_parallel_size
    if cfg.model.vocab_size is not None:
        return
    if vocab_size is None:
        try:
            vocab_size = build_tokenizer(cfg.tokenizer).vocab_size
        except (NeoxError, OSError) as e:
            raise ConfigError(
                f"model.vocab_size is unset and the tokenizer could not be loaded ({e}); pass "
                "--vocab-size N (the tokenizer's size) or --set model.vocab_size=N"
            ) from None
    resolve_vocab(cfg, vocab_size, tp=tp)


def collect(cfg, dp: int = 1) -> dict:
    """Everything `neox info` reports for a loaded Config, as plain numbers."""
    m, par = cfg.model, cfg.parallel
    try:
        micro = resolve_batch(cfg, dp)[0]
    except ConfigError:
        micro = 1  # info needs no batch; a training run would report the missing keys
    embed = m.vocab_size * m.hidden_size + (info.max_positions(m) * m.hidden_size if m.pos_emb == "learned" else 0)
    memory = info.memory_per_rank(
        m,
        precision=cfg.precision.precision,
        bf16_mode=cfg.precision.bf16_mode,
        optimizer=cfg.optimizer.type,
        micro_batch=micro,
        dp=dp,
        tp=par.model_parallel_size,
        pp=par.pipe_parallel_size,
        # FSDP2 has no optimizer-only sharding: ZeRO 1 also shards gradients, as 2 does (docs/parallelism.md)
        zero_stage=2 if par.zero_stage == 1 else par.zero_stage,
        checkpoint_activations=cfg.train.checkpoint_activations,
    )
    return {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_kv_heads": info.num_kv_heads(m),
        "head_dim": info.head_dim(m),
        "intermediate_size": info.intermediate_size(m),
        "vocab_size": m.vocab_size,
        "seq_length": m.seq_length,
        "pos_emb": m.pos_emb,
        "tied": not m.no_weight_tying,
        "params": info.num_params(m),
        "params_embedding": embed,
        "params_blocks": m.num_layers * info.layer_params(m),
        "flops_per_token": info.flops_per_token(m),
        "memory": memory,
        "memory_setup": {
            "precision": cfg.precision.precision,
            "micro_batch": micro,
            "dp": dp,
            "tp": par.model_parallel_size,
            "pp": par.pipe_parallel_size,
            "zero_stage": par.zero_stage,
            "checkpoint_activations": cfg.train.checkpoint_activations,
        },
    }


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_report(r: dict) -> str:
    s = r["memory_setup"]
    lines = [
        f"model: {r['num_layers']} layers, hidden {r['hidden_size']}, {r['num_attention_heads']} heads "
        f"({r['num_kv_heads']} kv, head_dim {r['head_dim']}), ffn {r['intermediate_size']}, "
        f"vocab {r['vocab_size']}, pos_emb {r['pos_emb']}, {'tied' if r['tied'] else 'untied'} output layer",
        f"parameters: {r['params']:,} ({_human(r['params'])}); blocks {_human(r['params_blocks'])}, "
        f"embeddings {_human(r['params_embedding'])}",
        f"FLOPs per token (forward+backward, seq {r['seq_length']}): {_human(r['flops_per_token'], 'FLOP')}  "
        "[6 * matmul params + 12 * layers * hidden * seq]",
        f"memory per rank ({s['precision']}, zero {s['zero_stage']}, dp {s['dp']}, tp {s['tp']}, pp {s['pp']}, "
        f"micro batch {s['micro_batch']}{', activation checkpointing' if s['checkpoint_activations'] else ''}):",
    ]
    lines += [f"  {k:<12}{_gib(v)}" for k, v in r["memory"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.dp < 1:
        raise ConfigError(f"--dp must be >= 1, got {args.dp}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ConfigError(f"--vocab-size must be >= 1, got {args.vocab_size}")
    cfg = load(args.configs, args.overrides, args.config_dir)
    _resolve_vocab(cfg, args.vocab_size)
    dp = args.dp
    if args.nproc is not None:
        if args.dp != 1:
            raise ConfigError("give --nproc or --dp, not both: --nproc derives the data-parallel size")
        dp = ParallelDims.from_config(cfg.parallel, args.nproc, cfg.model, ", ".join(args.configs)).dp
    report = collect(cfg, dp=dp)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
