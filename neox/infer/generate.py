"""The generation loop: batched prompts of different lengths, left padded, decoded on a preallocated KV cache.

Prompts are left padded to a common length; each row gets its own position ids (counting from its first real
token) and the cache is told which slots are padding, so every row computes exactly what it would alone.
`recompute=True` runs the whole sequence every step with no cache (slow; for checking the cache).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from neox.errors import NeoxError
from neox.infer import compiled
from neox.infer.gemv_layout import transposed_output_weight
from neox.infer.sampling import SamplingParams, choose_next
from neox.kernels.bf16_cpu import fast_bf16_linears
from neox.model.cache import KVCache, StaticKVCache

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, without the EOD that ended a row
    finish_reasons: list[str]  # "eod", "stop" (a stop string appeared) or "length"
    texts: list[str] | None = None  # decoded and cut before the first stop string, when `decode` was given
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def unwrap(model):
    """The GPT inside a wrapper (neox.load's LoadedModel, DDP): inference needs none of the wrapping."""
    while not hasattr(model, "layers") and hasattr(model, "module"):
        model = model.module
    return model


def _max_positions(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.pos_emb not in ("learned", "sinusoidal", "rotary"):
        return None  # relative encodings have no table to run past
    return cfg.max_position_embeddings or cfg.seq_length


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
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
    """
    model = unwrap(model)
    if compile and recompute:
        raise NeoxError("compile and recompute cannot be combined: recompute runs the whole sequence every step")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise NeoxError("every prompt needs at least one token (start unconditional samples from the EOD token)")
    if stop_strings and decode is None:
        raise NeoxError("stop strings need a tokenizer to decode the output")
    device = next(model.parameters()).device
    batch, lengths = len(prompts), [len(p) for p in prompts]
    prompt_len = max(lengths)
    total = prompt_len + max_new_tokens
    limit = _max_positions(model)
    if limit is not None and max(lengths) + max_new_tokens > limit:
        raise NeoxError(
            f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings={limit}: shorten the prompt or generate fewer tokens"
        )

    # left padding: row b's real tokens occupy slots [pad_b, total); positions count from the first real token
    pads = torch.tensor([prompt_len - n for n in lengths], device=device)
    tokens = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, prompt_len - len(p) : prompt_len] = torch.as_tensor(list(p), dtype=torch.long)
    slots = torch.arange(total, device=device)
    positions = (slots[None, :] - pads[:, None]).clamp(min=0)
    valid = slots[None, :] >= pads[:, None]
    padded = bool(pads.any())

    seen = None
    if params.repetition_penalty != 1.0:
        vocab = model.cfg.vocab_size
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens[:, :prompt_len], valid[:, :prompt_len])

    active = torch.ones(batch, dtype=torch.bool, device=device)
    reasons = ["length"] * batch
    texts_done: list[str | None] = [None] * batch
    ends: dict[int, int] = {}  # row -> number of output tokens, for rows that stopped early
    cache = None
    if compile:
        cache = StaticKVCache.for_model(model, batch_size=batch, max_len=compiled.bucketed_length(total, limit))
    elif not recompute:
        cache = KVCache.for_model(model, batch_size=batch, max_len=total)
    if cache is not None and padded:
        cache.mark_padding(valid[:, :prompt_len])

    # bf16 matmuls with several rows, on a CPU without bf16 units: the prefill always, decoding when batched
    # (a mode costs Python time on every op when eager; a compiled step pays it once, when traced)
    mode = fast_bf16_linears(model)
    several_rows = mode if mode is not None else contextlib.nullcontext()
    per_step = mode if mode is not None and (batch > 1 or compile) else contextlib.nullcontext()

    # eager decoding of one sequence on CPU: the output weight in the layout MKL's one-row product reads fastest
    # (a compiled step chooses its own layouts, and its frozen weights must not move)
    layout = contextlib.nullcontext() if compile else transposed_output_weight(model, batch, max_new_tokens)
    with layout:
        t0 = time.perf_counter()
        with _last_position_only(model), several_rows:
            logits = _forward(
                model, tokens[:, :prompt_len], positions[:, :prompt_len], valid[:, :prompt_len], cache, padded
            )
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = 0
        can_stop = eod_id is not None or bool(stop_strings)
        # a stop string is found in the last few tokens' text (tokens hold at least one byte, a char at most four)
        window = 4 * max((len(x) for x in stop_strings), default=0) + 4
        fused_greedy = params.greedy and seen is None  # the compiled step can return the argmax itself
        chosen = None
        for step in range(max_new_tokens):
            cur = prompt_len + step
            nxt = chosen if chosen is not None else choose_next(logits[:, -1], params, seen, generator)
            if can_stop:
                nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
            tokens[:, cur] = nxt
            steps += 1
            if seen is not None:
                seen.scatter_(1, nxt[:, None], active[:, None])
            if on_tokens is not None:
                on_tokens(nxt, active.clone())
            if eod_id is not None:
                ended = active & (nxt == eod_id)
                if bool(ended.any()):
                    for b in ended.nonzero().flatten().tolist():
                        reasons[b], ends[b] = "eod", step  # the EOD itself is not part of the output
                    active &= ~ended
            if stop_strings:
                for b in active.nonzero().flatten().tolist():
                    tail = decode(tokens[b, max(prompt_len, cur + 1 - window) : cur + 1].tolist())
                    if any(x and x in tail for x in stop_strings):
                        text, _ = cut_at_stop(decode(tokens[b, prompt_len : cur + 1].tolist()), stop_strings)
                        reasons[b], texts_done[b], ends[b] = "stop", text, step + 1
                        active[b] = False
            if step == max_new_tokens - 1 or (can_stop and not bool(active.any())):
                break
            if cache is None:
                with _last_position_only(model), several_rows:
                    logits = _forward(
                        model, tokens[:, : cur + 1], positions[:, : cur + 1], valid[:, : cur + 1], None, padded
                    )
            elif compile:
                with per_step:
                    out = compiled.decode(
                        model, tokens[:, cur : cur + 1], positions[:, cur : cur + 1], cache, fused_greedy
                    )
                if fused_greedy:
                    chosen = out
                else:
                    logits = out[:, None]
            else:
                with per_step:
                    logits = model(tokens[:, cur : cur + 1], position_ids=positions[:, cur : cur + 1], kv_cache=cache)
        decode_s = time.perf_counter() - t0

    out_tokens = []
    for b in range(batch):
        row = tokens[b, prompt_len : prompt_len + ends.get(b, steps)].tolist()
        out_tokens.append(row)
    texts = None
    if decode is not None:
        texts = [texts_done[b] if texts_done[b] is not None else decode(out_tokens[b]) for b in range(batch)]
    return GenerationResult(out_tokens, reasons, texts, prefill_s, decode_s, steps)


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


def _forward(model, tokens, positions, valid, cache, padded):
    """A prompt (or, without a cache, the whole sequence so far) through the model.

    Without a cache, padding is hidden by giving it its own segment id: attention stays within a segment.
    """
    if cache is not None:
        return model(tokens, position_ids=positions, kv_cache=cache)
    return model(tokens, position_ids=positions, segment_ids=valid.long() if padded else None)
