"""`neox info CONFIG... [--set KEY=VALUE]`: parameter count, FLOPs per token and per-rank memory estimates.

Pure arithmetic on the config (neox.model.info): nothing is allocated, so it answers for a 20B model at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


# Unpadded sizes of the tokenizer files that GPT-NeoX's README and configs name, by type and file name, so that
# `neox info` sizes the embedding of a Pythia or GPT-2-vocabulary config before the file is downloaded. Only
# used when the file is absent: a present file is always read, and training reads it (and checks
# model.vocab_size against it) whatever this table says.
KNOWN_VOCABS = {
    ("HFTokenizer", "20B_tokenizer.json"): 50277,  # GPT-NeoX-20B and Pythia
    ("GPT2BPETokenizer", "gpt2-vocab.json"): 50257,  # GPT-2's vocab.json (encoder.json), with gpt2-merges.txt
    ("HFTokenizer", "gpt2.json"): 50257,  # GPT-2 as one HF tokenizer file (GPT-NeoX's test data)
}


def _tokenizer_size(tcfg) -> tuple[int, str]:
    """The tokenizer's unpadded vocabulary size, and where it comes from (for the report)."""
    path = tcfg.vocab_file
    if path and not Path(path).exists() and (tcfg.tokenizer_type, Path(path).name) in KNOWN_VOCABS:
        size = KNOWN_VOCABS[(tcfg.tokenizer_type, Path(path).name)]
        return size, f"the known size of {Path(path).name}: {path} is not here"
    try:
        size = build_tokenizer(tcfg).vocab_size
    except (NeoxError, OSError) as e:
        raise ConfigError(
            f"model.vocab_size is unset and the tokenizer could not be loaded ({e}); pass "
            "--vocab-size N (the tokenizer's size) or --set model.vocab_size=N"
        ) from None
    return size, f"read from {path or tcfg.tokenizer_type}"


def _resolve_vocab(cfg, vocab_size: int | None) -> str:
    """Fill model.vocab_size as training would; returns where the size comes from."""
    if cfg.model.vocab_size is not None:
        return "set by model.vocab_size"
    if vocab_size is None:
        vocab_size, origin = _tokenizer_size(cfg.tokenizer)
    else:
        origin = "given by --vocab-size"
    tp = cfg.parallel.model_parallel_size
    resolve_vocab(cfg, vocab_size, tp=tp)
    multiple = cfg.model.make_vocab_size_divisible_by * tp
    return f"{vocab_size} tokens padded to a multiple of {multiple}; {origin}"


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
        "params_blocks": info.blocks_params(m),
        "params_active": info.num_active_params(m),
        "moe_layers": sum(info.is_moe_layer(m, i) for i in range(m.num_layers)),
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
        f"[6 * {'active ' if r['moe_layers'] else ''}matmul params + 12 * layers * hidden * seq]",
        f"memory per rank ({s['precision']}, zero {s['zero_stage']}, dp {s['dp']}, tp {s['tp']}, pp {s['pp']}, "
        f"micro batch {s['micro_batch']}{', activation checkpointing' if s['checkpoint_activations'] else ''}):",
    ]
    lines.insert(1, f"vocabulary: {r['vocab_size']} ({r['vocab_source']})")
    if r["moe_layers"]:
        lines.insert(
            3,
            f"mixture of experts: {r['moe_layers']} MoE layers; active parameters per token {r['params_active']:,} "
            f"({_human(r['params_active'])})",
        )
    lines += [f"  {k:<12}{_gib(v)}" for k, v in r["memory"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.dp < 1:
        raise ConfigError(f"--dp must be >= 1, got {args.dp}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ConfigError(f"--vocab-size must be >= 1, got {args.vocab_size}")
    # no "no effect" line: info answers from the shape alone (`neox config show` lists such keys)
    cfg = load(args.configs, args.overrides, args.config_dir, announce=False)
    vocab_source = _resolve_vocab(cfg, args.vocab_size)
    dp = args.dp
    if args.nproc is not None:
        if args.dp != 1:
            raise ConfigError("give --nproc or --dp, not both: --nproc derives the data-parallel size")
        dp = ParallelDims.from_config(cfg.parallel, args.nproc, cfg.model, ", ".join(args.configs)).dp
    report = {**collect(cfg, dp=dp), "vocab_source": vocab_source}
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
