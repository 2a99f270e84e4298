"""The compiled decode step (torch.compile on a StaticKVCache) generates what the eager loop generates."""

from pathlib import Path

import pytest
import torch

from neox.infer import compiled
from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from neox.model.cache import StaticKVCache
from tests.infer.tiny import random_model, tiny_config

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 1]]

pytestmark = pytest.mark.slow  # each shape compiles with inductor (C++), tens of seconds on 2 cores


def test_compiled_greedy_and_processed_logits_equal_eager_and_follow_weight_changes():
    model = random_model(tiny_config(pos_emb="rotary", num_kv_heads=2, rotary_pct=0.5), scale=0.3)
    eager = generate(model, PROMPTS, 10)
    fast = generate(model, PROMPTS, 10, compile=True)
    assert fast.tokens == eager.tokens
    assert fast.compile_s > 0  # the first call compiled, and says how long that took apart from decode_s
    # a second call with another prompt length reuses the step: same batch, same cache bucket
    again = generate(model, [p[:1] for p in PROMPTS], 10, compile=True)
    assert again.tokens == generate(model, [p[:1] for p in PROMPTS], 10).tokens
    assert again.compile_s == 0

    # repetition penalty needs the logits back from the step, then the eager processors
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    assert (
        generate(model, PROMPTS, 10, penalised, compile=True).tokens == generate(model, PROMPTS, 10, penalised).tokens
    )

    # the weights are frozen into the compiled graph: changing them must rebuild it, not reuse stale ones
    with torch.no_grad():
        model.final_layer_norm.weight.mul_(-1.0)  # every logit changes sign
    changed = generate(model, PROMPTS, 10)
    assert changed.tokens != eager.tokens
    assert generate(model, PROMPTS, 10, compile=True).tokens == changed.tokens

    # another model of the same shapes must not be served the first one's frozen graph
    other = random_model(tiny_config(pos_emb="rotary", num_kv_heads=2, rotary_pct=0.5), seed=1, scale=0.3)
    assert generate(other, PROMPTS, 10, compile=True).tokens == generate(other, PROMPTS, 10).tokens


def test_cache_length_is_bucketed_within_the_model_positions():
    assert compiled.bucketed_length(1, None) == compiled.CACHE_BUCKET
    assert compiled.bucketed_length(compiled.CACHE_BUCKET + 1, None) == 2 * compiled.CACHE_BUCKET
    assert compiled.bucketed_length(100, 120) == 120


def test_compile_with_recompute_is_refused():
    from neox.errors import NeoxError

    model = random_model(tiny_config())
    with pytest.raises(NeoxError, match="recompute"):
        generate(model, PROMPTS, 2, compile=True, recompute=True)


def test_compiled_bf16_decoding_runs_the_cpu_bf16_matmul_inside_the_graph():
    """bf16 weights: on a CPU without bf16 units the fp32-block op is traced into the step (the mode is active
    while compiling). Fused bf16 ops may round differently from eager ones, so near-ties could flip a token."""
    model = random_model(tiny_config(pos_emb="rotary", rotary_pct=0.5), scale=0.3).to(torch.bfloat16)
    eager = generate(model, PROMPTS, 8).tokens
    fast = generate(model, PROMPTS, 8, compile=True).tokens
    same = sum(a == b for row_e, row_f in zip(eager, fast) for a, b in zip(row_e, row_f))
    assert same >= 20, (eager, fast)  # of 24; they are all equal on the development machine


def test_a_compiler_failure_is_a_one_line_error(monkeypatch):
    import torch._inductor.config as inductor_config

    from neox.errors import NeoxError

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    model = random_model(tiny_config(num_layers=1), seed=2)
    with pytest.raises(NeoxError, match="compiling the decode step failed .* generate without --compile"):
        generate(model, PROMPTS, 3, compile=True)


def test_cuda_steps_replay_as_cuda_graphs_and_cpu_steps_do_not():
    """On CUDA the step is a CUDA graph, its cache tensors at fixed (unguarded) addresses; CPU options stay."""
    assert compiled.device_options("cuda")["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in compiled.device_options("cpu")
    assert compiled.device_options("cpu")["freezing"] is True
    assert compiled.device_options("cpu")["max_autotune"] is True  # fp32: inductor's C++ GEMM competes
    assert compiled.device_options("cpu", torch.bfloat16) == {"freezing": True}  # oneDNN-packed weights
    cache = StaticKVCache(2, 1, 8, 2, 4)
    compiled._mark_static(cache)
    tensors = (*cache.k, *cache.v, cache.key_valid, cache.positions, cache.slot)
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in tensors)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(compiled, "_INDUCTOR_DIR_AT_IMPORT", None)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("NEOX_CACHE_DIR", str(tmp_path))
    assert compiled.cache_dir() == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiled.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("NEOX_CACHE_DIR")
    assert compiled.cache_dir() == Path.home() / ".cache" / "neox" / "inductor"
