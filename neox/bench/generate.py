"""One generation measurement: neox's KV-cache loop (eager, or its compiled decode step: engine neox-compiled)
or transformers' `generate`, same weights and prompts.

Both decode greedily with no EOS, so every row yields exactly `new_tokens` tokens per prompt; tokens/s =
batch * new tokens / wall time (prefill included), best of `trials` after one warm-up. The Hugging Face model
is neox's, exported through neox.interop.hf_mapping, so the two sides hold the same weights.
"""

from __future__ import annotations

import time

import torch

from neox.bench.train import PYTHIA_LAYOUT, PYTHIA_SHAPES
from neox.config import from_dict
from neox.infer.generate import generate
from neox.interop.hf_mapping import to_hf_config, to_hf_state_dict
from neox.model import GPT
from neox.train.metrics import peak_memory_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model_config(shape: str):
    layers, hidden, heads = PYTHIA_SHAPES[shape.removeprefix("pythia-")]
    model = dict(PYTHIA_LAYOUT, num_layers=layers, hidden_size=hidden, num_attention_heads=heads, seq_length=2048)
    return from_dict({"model": model}).model


def build_pair(shape: str, dtype):
    """(neox GPT, transformers GPTNeoXForCausalLM) with the same random weights, in eval mode."""
    import transformers

    cfg = _model_config(shape)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    hf = transformers.GPTNeoXForCausalLM(to_hf_config(cfg)).eval()
    sd = to_hf_state_dict(cfg, ours.state_dict())
    sd["lm_head.weight"] = sd.pop("embed_out.weight")  # the file name (Pythia's) vs the module's in transformers 5
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours.to(dtype), hf.to(dtype)


def build_neox(shape: str, dtype):
    """The neox half of build_pair alone (same seed, so the same weights), without transformers."""
    torch.manual_seed(0)
    return GPT(_model_config(shape)).eval().to(dtype)


def time_neox(model, prompts, new_tokens: int, compile: bool = False) -> tuple[float, list]:
    t0 = time.perf_counter()
    res = generate(model, prompts, new_tokens, compile=compile)
    return time.perf_counter() - t0, res.tokens


def time_hf(model, prompts, new_tokens: int) -> tuple[float, list]:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return time.perf_counter() - t0, out[:, ids.shape[1] :].tolist()


def generate_case(
    engine: str, shape: str, dtype: str, batch: int, prompt_len: int, new_tokens: int, trials: int
) -> dict:
    """One engine, one (shape, dtype, batch) point: best tokens/s of `trials` and the tokens it produced."""
    if engine == "hf":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        _, model = build_pair(shape, DTYPES[dtype])
        timed = time_hf
    elif engine == "neox":
        model, timed = build_neox(shape, DTYPES[dtype]), time_neox
    elif engine == "neox-compiled":
        model = build_neox(shape, DTYPES[dtype])

        def timed(model, prompts, new_tokens):
            return time_neox(model, prompts, new_tokens, compile=True)
    else:
        raise ValueError(f"generate: unknown engine {engine!r}")
    gen = torch.Generator().manual_seed(1)  # the same prompts in all engines' processes
    prompts = torch.randint(0, 50000, (batch, prompt_len), generator=gen).tolist()
    # warm-up; the compiled step's is the full length, so that it compiles the cache-length bucket timed after
    t0 = time.perf_counter()
    timed(model, prompts, new_tokens if engine == "neox-compiled" else min(4, new_tokens))
    warmup_s = time.perf_counter() - t0
    best, tokens = float("inf"), []
    for _ in range(trials):
        seconds, tokens = timed(model, prompts, new_tokens)
        best = min(best, seconds)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "tokens_per_s": batch * new_tokens / best,
        "seconds": best,
        "peak_mem_bytes": peak_memory_bytes(device),
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        # the compiled step's first call compiles (or loads the compiled code from the disk cache)
        "first_step_s": warmup_s if engine == "neox-compiled" else None,
    }
