"""One MoE training measurement: an 8-expert top-2 neox model, a dense neox model with the same active
parameters, or transformers' MixtralForCausalLM of the same shape (exported from the MoE config).

neox runs its real Trainer step (neox.bench.train.run_neox: StepRunner forward/backward with the aux loss,
clipping, fused AdamW) on random tokens; the dense model's MLP is as wide as the k experts a token runs through
(k x expert width), so its FLOPs per token are the MoE model's less the router's. transformers runs
model(input_ids, labels).loss with its own balancing loss (output_router_logits), backward, clip_grad_norm_,
torch.optim.AdamW (neox.bench.train.run_hf's loop), bf16 as autocast over fp32 weights.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from neox.bench.train import run_neox
from neox.config import from_dict
from neox.config.schema import Config
from neox.interop.hf_mapping import to_hf_config
from neox.model import flops_per_token
from neox.train.metrics import peak_memory_bytes

ENGINES = ("neox-moe", "neox-dense", "hf-mixtral", "hf-mixtral-eager")


def moe_config(
    moe: bool,
    precision: str,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    experts: int = 8,
    top_k: int = 2,
    expert_width: int = 704,
    vocab: int = 8192,
    seq: int = 256,
    micro: int = 4,
    dispatch: str = "grouped_mm",
) -> Config:
    """A Mixtral-layout config (rmsnorm, full rotary, SwiGLU, no biases, untied): MoE, or dense with the same
    active MLP width."""
    model = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        seq_length=seq,
        max_position_embeddings=seq,
        vocab_size=vocab,
        pos_emb="rotary",
        rotary_pct=1.0,
        norm="rmsnorm",
        activation="swiglu",
        use_bias_in_attn_linear=False,
        use_bias_in_mlp=False,
        use_bias_in_norms=False,
        no_weight_tying=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        intermediate_size=expert_width if moe else top_k * expert_width,
    )
    if moe:
        model.update(
            moe_num_experts=experts,
            moe_top_k=top_k,
            moe_router_type="topk",
            moe_topk_renormalize=True,
            moe_aux_loss_coeff=0.01,
            moe_dispatch=dispatch,
        )
    prec, _, mode = precision.partition("-")
    return from_dict(
        {
            "model": model,
            "tokenizer": {"tokenizer_type": "ByteLevelTokenizer"},
            "train": {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "device": "auto"},
            "precision": {"precision": prec, **({"bf16_mode": mode} if mode else {})},
            "logging": {"progress_bar": False},
            "eval": {"eval_iters": 0},
        }
    )


def run_mixtral(cfg: Config, steps: int, warmup: int, precision: str, experts_impl: str | None = None):
    """transformers' usual loop on MixtralForCausalLM (its default experts implementation, or `experts_impl`:
    "eager" is its loop over the experts); returns the timed steps' seconds and the implementation it ran."""
    from transformers import MixtralForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = to_hf_config(cfg.model)
    hf_cfg.output_router_logits = True
    hf_cfg._attn_implementation = "sdpa"
    if experts_impl is not None:
        hf_cfg._experts_implementation = experts_impl
    torch.manual_seed(0)
    model = MixtralForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
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
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, str(getattr(model.config, "_experts_implementation", None))


def moe_train_case(engine: str, precision: str, steps: int, warmup: int, **shape) -> dict:
    """One engine's median training tokens/s at the given shape (moe_config's keyword arguments)."""
    if engine not in ENGINES:
        raise ValueError(f"moe_train: unknown engine {engine!r}")
    moe_cfg = moe_config(True, precision, **shape)
    extra = {}
    if engine.startswith("hf-mixtral"):
        impl = "eager" if engine == "hf-mixtral-eager" else None
        times, extra["hf_experts_implementation"] = run_mixtral(
            moe_cfg, steps, warmup, precision.partition("-")[0], impl
        )
    else:
        times = run_neox(moe_config(engine == "neox-moe", precision, **shape), steps, warmup)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = moe_cfg.train.train_micro_batch_size_per_gpu * moe_cfg.model.seq_length
    return {
        "tokens_per_s": tokens / statistics.median(times),
        "flops_per_token": flops_per_token(moe_cfg.model),
        "peak_mem_bytes": peak_memory_bytes(device),
        "step_times_s": times,
        "threads": torch.get_num_threads(),
        **extra,
    }
