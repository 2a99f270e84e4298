"""The generation loop: batched prompts of different lengths, left padded, decoded on a preallocated KV cache.

Prompts are left padded to a common length; each row gets its own position ids (counting from its first real
token) and the cache is told which slots are padding, so every row computes exactly what it would alone.
`recompute=True` runs the whole sequence every step with no cache (slow; for checking the cache).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from neox.errors import NeoxError
from neox.infer import compiled
from neox.infer.gemv_layout import transposed_output_weight
from neox.infer.packed import packed_linears
from neox.infer.sampling import SamplingParams, choose_next
from neox.infer.tensor_parallel import TokenSync, all_stopped_on, full_logits, lockstep_group
from neox.kernels.bf16_cpu import fast_bf16_linears
from neox.model.cache import KVCache, StaticKVCache

GREEDY = SamplingParams(temperature=0.0)
# On a GPU, reading whether every row has stopped waits for the device to drain its queue, so the loop asks every
# few tokens (the steps past a stop are padding, cut from the output). On a CPU the read is free and a step past
# the end is not: it asks every token.
STOP_CHECK_EVERY_GPU = 8


def stop_check_every(device: torch.device) -> int:
    """Tokens between the loop's checks that every row has stopped."""
    return 1 if device.type == "cpu" else STOP_CHECK_EVERY_GPU


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, without the EOD that ended a row
    finish_reasons: list[str]  # "eod", "stop" (a stop string appeared) or "length"
    texts: list[str] | None = None  # decoded and cut before the first stop string, when `decode` was given
    prefill_s: float = 0.0
    decode_s: float = 0.0  # without compile_s
    steps: int = 0
    compile_s: float = 0.0  # time the compiled decode step spent compiling (first batch of a shape only)
    extra: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def unwrap(model):
    """The GPT inside a wrapper (neox.load's LoadedModel, DDP): inference needs none of the wrapping."""
    # LoadedModel passes attribute lookups through to its GPT, so answering `layers` does not make it one
    while hasattr(model, "module") and not (isinstance(model, torch.nn.Module) and hasattr(model, "layers")):
        model = model.module
    return model


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _without_autograd(fn):
    """`fn` under inference_mode in one process. Under torch.distributed, under no_grad: a training model's
    data-parallel wrapper (DDP's buckets, built at its first forward; FSDP2's gathered weights) must not keep
    inference tensors that its next training step would write."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        with torch.no_grad() if distributed else torch.inference_mode():
            return fn(*args, **kwargs)

    return run


@_without_autograd
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    eod_id: int | None = None,
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    generator: torch.Generator | None = None,
    recompute: bool = False,
    pad_id: int = 0,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    compile: bool = False,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    A row stops at `eod_id` (when given) or once its decoded output contains a stop string (needs `decode`).
    `on_tokens(tokens [B], active [B] bool)` is called after every step, for streaming.
    `compile=True` decodes with a torch.compile'd step (neox.infer.compiled): the first call for a batch size
    and cache length compiles (seconds to a minute), later ones reuse it.
    A tensor-parallel model (neox.infer.tensor_parallel) is run the same way on every rank, each step's tokens
    taken from rank 0 so that the ranks' outputs and stops are identical; a model sharded over data-parallel
    ranks (FSDP2) steps until every one of them has stopped.
    """
    model = unwrap(model)
    _check_request(model, prompts, max_new_tokens, stop_strings, decode, recompute, compile)
    sync, lockstep = TokenSync(model), lockstep_group(model)
    if sync.active and compile:
        raise NeoxError("compiled decoding is not supported under tensor parallelism (--nproc > 1) yet; drop --compile")
    batch = PaddedBatch.of(prompts, max_new_tokens, pad_id, next(model.parameters()).device)
    cache = _make_cache(model, batch, recompute, compile)
    stops = StopTracker(batch, eod_id, stop_strings, decode)
    next_tokens = NextTokens(model, batch, cache, params, generator, compile)

    # eager decoding on CPU: weights in the layouts the few-row products read fastest (oneDNN's packed layout;
    # for one fp32 row, the output weight transposed for MKL's GEMV). A compiled step chooses its own layouts,
    # and its frozen weights must not move.
    layout = contextlib.ExitStack()
    if not compile:
        layout.enter_context(packed_linears(model, batch.size))
        layout.enter_context(transposed_output_weight(model, batch.size, max_new_tokens))
    with layout:
        t0 = time.perf_counter()
        next_tokens.prefill()
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = 0
        for step in range(max_new_tokens):
            cur = batch.prompt_len + step
            # a rank whose rows have all stopped steps on only for its lockstep group's sake: it draws nothing, so
            # its random stream is where it would be had it stopped
            nxt = stops.padding() if stops.idle else stops.pad_finished(sync(next_tokens.choose()))
            batch.tokens[:, cur] = nxt
            steps += 1
            next_tokens.record(nxt, stops.active)
            if on_tokens is not None:
                on_tokens(nxt, stops.active.clone())
            stops.update(nxt, step)
            if step == max_new_tokens - 1 or stops.all_stopped(step, lockstep):
                break
            next_tokens.advance(cur)
        compile_s = next_tokens.timings.get("compile_s", 0.0)
        decode_s = time.perf_counter() - t0 - compile_s

    tokens, texts = stops.outputs(steps)
    return GenerationResult(tokens, stops.reasons, texts, prefill_s, decode_s, steps, compile_s=compile_s)


def _max_positions(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.pos_emb not in ("learned", "sinusoidal", "rotary"):
        return None  # relative encodings have no table to run past
    return cfg.max_position_embeddings or cfg.seq_length


def _check_request(model, prompts, max_new_tokens: int, stop_strings, decode, recompute: bool, compile: bool):
    if compile and recompute:
        raise NeoxError("compile and recompute cannot be combined: recompute runs the whole sequence every step")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise NeoxError("every prompt needs at least one token (start unconditional samples from the EOD token)")
    if stop_strings and decode is None:
        raise NeoxError("stop strings need a tokenizer to decode the output")
    longest, limit = max(len(p) for p in prompts), _max_positions(model)
    if limit is not None and longest + max_new_tokens > limit:
        raise NeoxError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings={limit}: shorten the prompt or generate fewer tokens"
        )


@dataclass
class PaddedBatch:
    """The prompts left padded into one token buffer with room for the output: row b's real tokens occupy
    slots [pad_b, total); positions count from each row's first real token, `valid` is False on padding."""

    tokens: torch.Tensor  # [B, total] long, the output written in place after slot prompt_len
    positions: torch.Tensor  # [B, total] long
    valid: torch.Tensor  # [B, total] bool
    prompt_len: int
    pad_id: int
    padded: bool  # whether any row is padded at all

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, device) -> PaddedBatch:
        lengths = [len(p) for p in prompts]
        prompt_len = max(lengths)
        total = prompt_len + max_new_tokens
        pads = torch.tensor([prompt_len - n for n in lengths], device=device)
        tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, prompt_len - len(p) : prompt_len] = torch.as_tensor(list(p), dtype=torch.long)
        slots = torch.arange(total, device=device)
        positions = (slots[None, :] - pads[:, None]).clamp(min=0)
        valid = slots[None, :] >= pads[:, None]
        return cls(tokens, positions, valid, prompt_len, pad_id, bool(pads.any()))

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def total(self) -> int:
        return self.tokens.shape[1]


def _make_cache(model, batch: PaddedBatch, recompute: bool, compile: bool) -> KVCache | None:
    """None when recomputing; a StaticKVCache (fixed shapes, bucketed length) for the compiled step."""
    if recompute:
        return None
    if compile:
        max_len = compiled.bucketed_length(batch.total, _max_positions(model))
        cache = StaticKVCache.for_model(model, batch_size=batch.size, max_len=max_len)
    else:
        cache = KVCache.for_model(model, batch_size=batch.size, max_len=batch.total)
    if batch.padded:
        cache.mark_padding(batch.valid[:, : batch.prompt_len])
    cache.positions_checked = True  # _check_request checked the whole range against the model's positions
    return cache


class NextTokens:
    """Each step's next token per row: the model's logits at the last position (prefill, then one decode step
    at a time, or the whole sequence again when there is no cache), the repetition penalty, the choice."""

    def __init__(self, model, batch: PaddedBatch, cache, params: SamplingParams, generator, compile: bool):
        self.model, self.batch, self.cache = model, batch, cache
        self.params, self.generator = params, generator
        self.seen = None  # [B, V] bool: tokens already in each row, for the repetition penalty
        if params.repetition_penalty != 1.0:
            n = batch.prompt_len
            self.seen = torch.zeros(batch.size, model.cfg.vocab_size, dtype=torch.bool, device=batch.tokens.device)
            self.seen.scatter_(1, batch.tokens[:, :n], batch.valid[:, :n])
        # bf16 matmuls with several rows, on a CPU without bf16 units: the prefill always, decoding when batched
        # (a mode costs Python time on every op when eager; a compiled step pays it once, when traced)
        mode = fast_bf16_linears(model)
        self.several_rows = mode if mode is not None else contextlib.nullcontext()
        self.per_step = mode if mode is not None and (batch.size > 1 or compile) else contextlib.nullcontext()
        self.fused_greedy = params.greedy and self.seen is None  # the compiled step can return the argmax itself
        self.advance = self._recompute if cache is None else self._compiled if compile else self._cached
        self.logits = None  # [B, 1|T, V] at the last step
        self.chosen = None  # [B], when the compiled step chose them itself
        self.timings: dict = {}  # compile_s: time the compiled step spent compiling

    def prefill(self) -> None:
        self.logits = self._full(self.batch.prompt_len, self.cache)

    def choose(self) -> torch.Tensor:
        if self.chosen is not None:
            return self.chosen
        return choose_next(self.logits[:, -1], self.params, self.seen, self.generator)

    def record(self, nxt: torch.Tensor, active: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], active[:, None])

    def _full(self, end: int, cache):
        """Slots [0, end) through the model: the prompt into the cache, or without a cache the whole sequence,
        with padding given its own segment id so that attention stays within the real tokens."""
        b = self.batch
        tokens, positions = b.tokens[:, :end], b.positions[:, :end]
        with _last_position_only(self.model), self.several_rows:
            if cache is not None:
                return full_logits(self.model(tokens, position_ids=positions, kv_cache=cache))
            segments = b.valid[:, :end].long() if b.padded else None
            return full_logits(self.model(tokens, position_ids=positions, segment_ids=segments))

    def _recompute(self, cur: int) -> None:
        self.logits = self._full(cur + 1, None)

    def _cached(self, cur: int) -> None:
        b = self.batch
        with self.per_step:
            self.logits = full_logits(
                self.model(b.tokens[:, cur : cur + 1], position_ids=b.positions[:, cur : cur + 1], kv_cache=self.cache)
            )

    def _compiled(self, cur: int) -> None:
        b = self.batch
        with self.per_step:
            out = compiled.decode(
                self.model,
                b.tokens[:, cur : cur + 1],
                b.positions[:, cur : cur + 1],
                self.cache,
                self.fused_greedy,
                self.timings,
            )
        if self.fused_greedy:
            self.chosen = out
        else:
            self.logits = out[:, None]


class StopTracker:
    """Which rows are still generating and why each stopped: at `eod_id`, at a stop string in the decoded
    output, or after max_new_tokens ("length").

    The EOD check stays on the device (a row's EOD is its first in the output, found once at the end), so a
    step reads nothing back; only stop strings, which need the text, read the new tokens every step."""

    def __init__(self, batch: PaddedBatch, eod_id: int | None, stop_strings: Sequence[str], decode):
        self.batch, self.eod_id, self.stop_strings, self.decode = batch, eod_id, stop_strings, decode
        device = batch.tokens.device
        self.active = torch.ones(batch.size, dtype=torch.bool, device=device)
        self.reasons = ["length"] * batch.size
        self.texts: list[str | None] = [None] * batch.size
        self.ends: dict[int, int] = {}  # row -> number of output tokens, for rows that stopped early
        self.can_stop = eod_id is not None or bool(stop_strings)
        self.idle = False  # every row stopped, seen at a check (the loop goes on only for a lockstep group)
        # stop strings read the tokens every step anyway: then the loop may as well check every step
        self.check_every = 1 if stop_strings else stop_check_every(device)
        # a stop string is found in the last few tokens' text (tokens hold at least one byte, a char at most four)
        self.window = 4 * max((len(x) for x in stop_strings), default=0) + 4

    def padding(self) -> torch.Tensor:
        """A step's tokens once every row has stopped."""
        return torch.full_like(self.active, self.batch.pad_id, dtype=self.batch.tokens.dtype)

    def pad_finished(self, nxt: torch.Tensor) -> torch.Tensor:
        """Rows that have stopped get padding instead of a token."""
        if not self.can_stop:
            return nxt
        return torch.where(self.active, nxt, torch.full_like(nxt, self.batch.pad_id))

    def update(self, nxt: torch.Tensor, step: int) -> None:
        if self.eod_id is not None:
            self.active &= nxt != self.eod_id
        if self.stop_strings:
            self._check_stop_strings(step)

    def _check_stop_strings(self, step: int) -> None:
        tokens, start, cur = self.batch.tokens, self.batch.prompt_len, self.batch.prompt_len + step
        for b in self.active.nonzero().flatten().tolist():
            tail = self.decode(tokens[b, max(start, cur + 1 - self.window) : cur + 1].tolist())
            if any(x and x in tail for x in self.stop_strings):
                text, _ = cut_at_stop(self.decode(tokens[b, start : cur + 1].tolist()), self.stop_strings)
                self.reasons[b], self.texts[b], self.ends[b] = "stop", text, step + 1
                self.active[b] = False

    def all_stopped(self, step: int, group=None) -> bool:
        """Whether every row has stopped, asked (a host read) only every `check_every` steps; with `group`,
        every row of every rank in it (neox.infer.tensor_parallel.lockstep_group)."""
        if not (self.can_stop and (step + 1) % self.check_every == 0):
            return False
        self.idle = not bool(self.active.any())
        return all_stopped_on(group, self.idle, self.active.device)

    def _find_eods(self, start: int, steps: int) -> None:
        """Rows that stopped at an EOD: its step is the first EOD of the row's output (the padding after a stop
        may be EOD tokens too, but a row stopped by a stop string is in `ends` already)."""
        is_eod = self.batch.tokens[:, start : start + steps] == self.eod_id
        first = torch.where(is_eod.any(dim=1), is_eod.int().argmax(dim=1), -1)  # argmax: the first maximum
        for b, at in enumerate(first.tolist()):
            if at >= 0 and b not in self.ends:  # the EOD itself is not part of the output
                self.reasons[b], self.ends[b] = "eod", at

    def outputs(self, steps: int) -> tuple[list[list[int]], list[str] | None]:
        """Each row's new tokens (cut where it stopped) and, with `decode`, its text."""
        start = self.batch.prompt_len
        if self.eod_id is not None:
            self._find_eods(start, steps)
        tokens = [
            self.batch.tokens[b, start : start + self.ends.get(b, steps)].tolist() for b in range(self.batch.size)
        ]
        if self.decode is None:
            return tokens, None
        texts = [t if t is not None else self.decode(row) for t, row in zip(self.texts, tokens)]
        return tokens, texts


@contextlib.contextmanager
def select_hidden(model, select: Callable[[torch.Tensor], torch.Tensor]):
    """Apply `select` to the final-norm output [B, T, H] before the output layer, so that only the positions
    whose logits are needed pay for the [*, V] projection (for a 50k vocabulary, most of a small model's cost).
    Yields whether the cut is in place (a model without a final norm gives full logits).
    """
    norm = getattr(model, "final_layer_norm", None)
    handle = norm.register_forward_hook(lambda mod, inp, out: select(out)) if norm is not None else None
    try:
        yield handle is not None
    finally:
        if handle is not None:
            handle.remove()


def _last_position_only(model):
    return select_hidden(model, lambda h: h[:, -1:])
