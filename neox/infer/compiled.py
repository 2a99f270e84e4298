"""A compiled decode step: one token per row through the model on a StaticKVCache, plus the greedy choice.

Eager decoding of a small model is mostly per-op overhead (~200 ops a token) and, on CPU, matmuls with a
handful of rows, where MKL is far from peak. Inductor fuses the elementwise ops and, for fp32 weights with max-autotune,
picks its own CPU GEMM when that is faster (figures in docs/benchmarks.md, "Kernel measurements"). Freezing folds the weights in as constants, which is what lets it pre-pack them, so a compiled step
is only valid while the weights stay as they were: the step is rebuilt when any parameter changes.

Shapes must not change from step to step: the cache is a StaticKVCache, and its length is rounded up to a
multiple of CACHE_BUCKET so that generations with different prompt lengths reuse one compiled step.

On a GPU the step is replayed as a CUDA graph (inductor's cudagraph trees, what mode="reduce-overhead" turns on):
one launch a token instead of a few hundred kernel launches from Python. The cache's tensors, written inside the
step, are marked static so the graph replays those writes in place (a graph is otherwise skipped for "mutated
inputs"); a graph's outputs are overwritten by its next replay, so each step's is copied out. CPUs keep the
eager-launch code they have (there is no launch overhead to save).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from neox.errors import NeoxError

CACHE_BUCKET = 128
# CPU, fp32 weights: let inductor's C++ GEMM template compete with MKL (pythia-70m on a 2-core Zen 5, 2 threads:
# 202 vs 99 tokens/s at batch 1, 739 vs 396 at batch 8). bf16/fp16 weights: freezing alone, which multiplies
# by oneDNN-packed weights, as eager decoding does (neox.infer.packed); the C++ template lost to it at one row
# (252 vs 329 tokens/s) and tied at eight, and autotuning added 15-20 s to each compile.
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
CPU_LOW_PRECISION_OPTIONS = {"freezing": True}
# CUDA: the step as a CUDA graph (the cudagraphs of torch.compile's mode="reduce-overhead", which cannot be
# combined with the options this module passes)
CUDA_OPTIONS = {"triton.cudagraphs": True}
QUIET = {"autotune_num_choices_displayed": 0}  # no autotuning tables on the terminal
RECOMPILE_LIMIT = 32  # distinct (batch, cache length, greedy) shapes one model may be compiled for

# The step of the one model compiled last. Dynamo keys compiled code on _Decode.forward's code object and,
# with module guards skipped, cannot tell two models' frozen graphs apart: so one model at a time, and
# switching models starts over.
_current: dict = {"model": None, "step": None}


# the user's choice, read before inductor's config is imported (which fills in its /tmp default); None if
# inductor was imported first (the variable then holds what it chose, or the user's)
_INDUCTOR_DIR_AT_IMPORT = (
    None if "torch._inductor.config" in sys.modules else os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
)


def cache_dir() -> Path:
    """Where inductor keeps compiled code and autotuning results between processes, so a shape is compiled
    once per machine: $TORCHINDUCTOR_CACHE_DIR when set, else $NEOX_CACHE_DIR/inductor, else
    ~/.cache/neox/inductor (inductor's own default, under /tmp, does not survive a reboot)."""
    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR") if _INDUCTOR_DIR_AT_IMPORT is None else _INDUCTOR_DIR_AT_IMPORT
    if user:
        return Path(user)
    root = os.environ.get("NEOX_CACHE_DIR") or Path.home() / ".cache" / "neox"
    return Path(root) / "inductor"


def bucketed_length(needed: int, limit: int | None) -> int:
    """Cache length for `needed` slots, rounded up to the bucket (but never past the model's positions)."""
    rounded = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
    return min(rounded, limit) if limit is not None else rounded


class _Decode(torch.nn.Module):
    """The step as a module holding the model, so the compiler sees the weights as the module's own (which
    freezing needs) rather than as arguments."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, cache, greedy: bool):
        # one query row per sequence: the math form lets inductor fuse mask, softmax and the two small bmm's
        with sdpa_kernel(SDPBackend.MATH):
            logits = self.model(tokens, position_ids=positions, kv_cache=cache)[:, -1]
        return logits.float().argmax(dim=-1) if greedy else logits


class CompiledStep:
    def __init__(self, model):
        self.versions = self._versions(model)
        first = next(model.parameters())
        device = first.device.type
        self.cuda_graphs = device == "cuda"
        # given as torch.compile(options=...), freezing was not applied (torch 2.13): the config is patched
        # around each call instead, which covers the compilations the call triggers
        self.options = {**device_options(device, first.dtype), **QUIET}
        self.shapes: set = set()  # (batch, cache length, greedy) already compiled for
        # guards on every parameter cost a check per parameter every step; weight changes are caught by
        # `stale` instead
        self.fn = torch.compile(
            _Decode(model),
            fullgraph=True,
            dynamic=False,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
        )

    @staticmethod
    def _versions(model) -> tuple:
        # identity and storage too: a parameter replaced or re-pointed (load_state_dict(assign=True), .data =)
        return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())

    def stale(self, model) -> bool:
        return self._versions(model) != self.versions


def device_options(device_type: str, dtype: torch.dtype = torch.float32) -> dict:
    """Inductor options of the decode step on this device type and weight dtype (others keep inductor's
    defaults)."""
    if device_type == "cpu":
        return CPU_OPTIONS if dtype == torch.float32 else CPU_LOW_PRECISION_OPTIONS
    return {"cuda": CUDA_OPTIONS}.get(device_type, {})


def _mark_static(cache) -> None:
    """Give the cache's tensors fixed addresses for CUDA graphs. guard=False: another cache (the next
    generation's) re-records the graph, which costs about a step, instead of compiling the step again."""
    if getattr(cache, "_static_for_graphs", False):
        return
    for t in (*cache.k, *cache.v, cache.key_valid, cache.positions, cache.slot):
        torch._dynamo.mark_static_address(t, guard=False)
    cache._static_for_graphs = True


def step_for(model) -> CompiledStep:
    """The compiled decode step of `model`, compiled again if its weights changed since."""
    current = _current["model"]() if _current["model"] is not None else None
    step = _current["step"] if current is model else None
    if step is None or step.stale(model):
        if _current["step"] is not None:
            torch._dynamo.reset()  # the old graphs hold another model's (or stale) weights
        step = CompiledStep(model)
        _current.update(model=weakref.ref(model), step=step)
    return step


def decode(model, tokens, positions, cache, greedy: bool, timings: dict | None = None):
    """One compiled decode step: [B] next tokens when greedy, else [B, V] logits.

    A call that compiles (a new batch size, cache length or greedy flag) adds its wall time to
    `timings["compile_s"]`, so that throughput can be reported without it."""
    step = step_for(model)
    if step.cuda_graphs:
        _mark_static(cache)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
    key = (tokens.shape[0], cache.max_len, greedy)
    if key in step.shapes:
        return _copied(step, _run(step, tokens, positions, cache, greedy))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the compiler's deprecation notices are not for someone sampling text
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = _run(step, tokens, positions, cache, greedy)
    step.shapes.add(key)
    if timings is not None:
        timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - t0
    return _copied(step, out)


def _copied(step: CompiledStep, out: torch.Tensor) -> torch.Tensor:
    """A CUDA graph's output lives in its memory pool until the next replay: the caller keeps a copy."""
    return out.clone() if step.cuda_graphs else out


def _run(step: CompiledStep, tokens, positions, cache, greedy: bool):
    # inductor reads the variable whenever it looks for its cache (its config's import sets it if unset)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
    import torch._inductor.config  # inductor's config loads the compiler stack: only when a step is compiled

    try:
        with (
            torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
            torch._inductor.config.patch(step.options),
        ):
            return step.fn(tokens, positions, cache, greedy)
    except torch._dynamo.exc.TorchDynamoException as e:
        # e.g. no working C++ compiler for inductor's CPU code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeoxError(
            f"compiling the decode step failed ({type(e).__name__}: {first[:300]}); "
            "generate without --compile (compile_decode: false)"
        ) from e
