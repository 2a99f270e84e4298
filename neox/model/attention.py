"""Self-attention over a fused qkv projection, per-layer attention types, and what one forward shares.

The fused projection's output rows are grouped per key/value group: [q_0 .. q_{g-1}, k, v] heads for group 0,
then group 1, ... (g = query heads per kv head). Without GQA this is HF GPTNeoX's per-head [q, k, v]
interleave, and a tensor-parallel column split by kv groups keeps each rank's heads whole.

Each layer has a type (GPT-NeoX's attention_config): global, or a block-sparse layout (local, sparse_fixed,
sparse_variable, bigbird, bslongformer); sliding_window_width adds a token window to every layer. Plain
causal attention goes straight to SDPA's causal kernel. Anything with a mask or bias (ALiBi, T5 buckets,
documents, a window, a layout, a KV cache) runs one of neox.model.attention_paths, picked per layer by
`model.attention_impl` (auto: FlexAttention on CUDA; on CPU block-sparse for layouts and query-chunked SDPA
otherwise), with masks evaluated per tile and never as a [B, H, T, T] tensor (except on the dense path).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.attention import GLOBAL, layer_sparsity
from neox.config.schema import ModelConfig
from neox.errors import NeoxError
from neox.model import attention_paths as paths
from neox.model import mup
from neox.model.attention_cpu import CausalBlocks, causal_on_cpu, decoding_on_cpu, few_queries
from neox.model.info import head_dim, num_kv_heads
from neox.model.layers import build_norm
from neox.model.masks import ForwardMask, LayerMask, rpe_by_distance
from neox.model.positional import RelativePositionBias, apply_rotary
from neox.model.sparsity import block_layout, layout_seed, num_blocks

IMPLS = ("auto", "dense", "chunked", "block_sparse", "flex")


@dataclass
class AttentionInputs:
    """Everything attention needs that does not depend on the layer; built once per forward.

    causal_fast: the is_causal flag for SDPA when a layer without a window or layout can skip masks
    altogether (no bias, documents, padding or cache offset), else None. mask: what queries may see.
    layer_masks: per layer mask key, its window / layout. pairs / block_masks: per mask key, the block pairs
    (block-sparse path) and FlexAttention block masks, when those paths run. rotary: (cos, sin) broadcastable
    over the fused qkv view.
    """

    causal_fast: bool | None
    mask: ForwardMask
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    impl: str
    layer_masks: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)
    block_masks: dict = field(default_factory=dict)


def mask_key(cfg: ModelConfig, layer: int) -> tuple:
    """Layers with equal keys have equal masks: their type and, for random blocks, their layer's seed."""
    p = layer_sparsity(cfg, layer)
    if p is None:
        return (GLOBAL,)
    return (p.kind, layout_seed(layer) if p.num_random_blocks else None)


class SparseLayouts(nn.Module):
    """The block layouts of a model's layer types, built once (at the model's seq_length, or longer when a
    sequence needs more blocks; shorter sequences use the top-left corner) and kept with their block pairs,
    so layouts are read on the host once per length, not per layer or step.

    `forward(key, nb, device)` returns bool [1, H, nb, nb] for all query heads; a tensor-parallel rank keeps
    its heads through a forward hook, as it does for ALiBi.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_attention_heads
        self._built: dict = {}
        self._pairs: dict = {}

    def params(self, key: tuple):
        return layer_sparsity(self.cfg, list(self.cfg.attention_types).index(key[0]))

    def forward(self, key: tuple, nb: int, device: torch.device) -> torch.Tensor:
        p = self.params(key)
        full = max(nb, num_blocks(self.cfg.seq_length, p))
        cached = self._built.get((key, device))
        if cached is None or cached.shape[-1] < full:
            seed = key[1] if key[1] is not None else 0
            cached = block_layout(p.kind, p, self.num_heads, full, seed).to(device)[None]
            self._built[(key, device)] = cached
        return cached[:, :, :nb, :nb]

    def pairs(self, key: tuple, lm: LayerMask, t: int) -> paths.BlockPairs:
        """The block pairs of this rank's layout `lm.layout` cut to t queries."""
        k = (key, t, lm.layout.shape[0], lm.layout.device)
        if k not in self._pairs:
            self._pairs[k] = paths.BlockPairs(lm.layout, lm.block, t)
        return self._pairs[k]


def qk_norm(cfg: ModelConfig) -> nn.Module:
    """The model's norm type over one head's dims, shared by queries and keys as GPT-NeoX shares it."""
    return build_norm(dataclasses.replace(cfg, hidden_size=head_dim(cfg)))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mask_key = mask_key(cfg, layer_idx)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = num_kv_heads(cfg)
        self.group = self.num_heads // self.num_kv_heads
        self.head_dim = head_dim(cfg)
        self.dropout = cfg.attention_dropout
        h, bias = cfg.hidden_size, cfg.use_bias_in_attn_linear
        self.query_key_value = nn.Linear(h, self.num_kv_heads * (self.group + 2) * self.head_dim, bias=bias)
        self.qk_layernorm = qk_norm(cfg) if cfg.use_qk_layernorm else None
        self.query_scale = mup.query_scale(cfg)  # muP's 1/head_dim softmax scale, folded into the queries
        self.dense = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.rpe = None
        if cfg.pos_emb == "rpe":
            self.rpe = RelativePositionBias(cfg.rpe_num_buckets, cfg.rpe_max_distance, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        g, hd = self.group, self.head_dim
        # head counts come from the tensor (-1), so a tensor-parallel shard holding some kv groups works too
        qkv = self.query_key_value(x).view(b, t, -1, g + 2, hd)
        qk = qkv[:, :, :, : g + 1]
        if self.qk_layernorm is not None:
            # per head, before rotary (GPT-NeoX's placement)
            qk = self.qk_layernorm(qk)
        if inputs.rotary is not None:
            # q and k rotated in one op: the cos/sin tables broadcast over groups and heads
            qk = apply_rotary(qk, *inputs.rotary)
        q = qk[:, :, :, :g].reshape(b, t, -1, hd).transpose(1, 2)
        if self.query_scale != 1.0:
            q = q * self.query_scale
        k = qk[:, :, :, g].transpose(1, 2)
        v = qkv[:, :, :, g + 1].transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        out = self.attend(q, k, v, inputs)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))

    def rpe_table(self) -> torch.Tensor:
        """This layer's T5 bias per (local head, bucket), through the module so a tensor-parallel shard's
        head slice applies."""
        buckets = torch.arange(self.rpe.num_buckets, device=self.rpe.relative_attention_bias.weight.device)
        return self.rpe(buckets[None, :, None])[0, :, :, 0]

    def attend(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        fm, lm = inputs.mask, inputs.layer_masks[self.mask_key]
        dropout = self.dropout if self.training else 0.0
        if inputs.causal_fast is not None and lm.trivial:
            if not inputs.causal_fast and decoding_on_cpu(q, k, dropout):
                return few_queries(q, k, v, None)  # a decode step over the whole cache
            if inputs.causal_fast and causal_on_cpu(q, k, dropout):
                return CausalBlocks.apply(q, k, v)
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=inputs.causal_fast, enable_gqa=self.group > 1
            )
        table = rpe_by_distance(fm, self.rpe_table()) if self.rpe is not None else None
        path = inputs.impl
        if path == "flex":
            return paths.flex(q, k, v, fm, lm, inputs.block_masks[self.mask_key], table, compiled=q.is_cuda)
        if path == "dense":
            return paths.dense(q, k, v, fm, lm, table, dropout)
        if path == "block_sparse" and lm.layout is not None:
            return paths.block_sparse(q, k, v, fm, lm, inputs.pairs[self.mask_key], table, dropout)
        return paths.chunked(q, k, v, fm, lm, table, dropout)


def resolve_impl(impl: str, device: torch.device, kv_cache, training_dropout: bool, needs_grad: bool) -> str:
    """The path this forward's masked layers take. auto: FlexAttention on CUDA (not with attention dropout,
    which it lacks, nor with a KV cache, whose decode steps are one query long); elsewhere block-sparse for
    layouts and query-chunked SDPA for the rest."""
    if impl not in IMPLS:
        raise NeoxError(f"model.attention_impl {impl!r} is not one of {', '.join(IMPLS)}")
    if kv_cache is not None and impl in ("block_sparse", "flex", "auto"):
        return "chunked"
    if impl == "flex" and device.type == "cpu" and needs_grad:
        raise NeoxError(
            "model.attention_impl: flex has no backward pass on CPU in this torch; use auto or chunked to train"
        )
    if impl == "auto":
        return "flex" if device.type == "cuda" and not training_dropout else "block_sparse"
    return impl


def build_attention_inputs(
    model,
    batch: int,
    seq: int,
    positions: torch.Tensor,
    segment_ids: torch.Tensor | None,
    kv_cache,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionInputs:
    """Masks and positional tables for one forward of `model` (a neox.model.GPT).

    positions: [B, T] position ids, or [1, T] when the whole batch shares them.
    Causality is by token order (slot in the cache), never by position value, so left padding and
    reset_position_ids cannot let a token see the future; ALiBi / T5 distances use the position values.
    """
    pos_emb = model.pos_emb
    rotary = model.rotary(positions, dtype) if pos_emb == "rotary" else None
    fm = forward_mask(model, batch, seq, positions, segment_ids, kv_cache, device)
    plain = fm.segments is None and fm.key_valid is None and not fm.has_bias
    causal_fast = None
    if plain and isinstance(fm.q_offset, int):
        if fm.q_offset == 0:
            causal_fast = True
        elif seq == 1:
            causal_fast = False  # one new token sees every cached key
    needs_grad = torch.is_grad_enabled() and model.reference_param().requires_grad
    training_dropout = model.training and model.cfg.attention_dropout > 0
    impl = resolve_impl(model.attention_impl, device, kv_cache, training_dropout, needs_grad)
    inputs = AttentionInputs(causal_fast=causal_fast, mask=fm, rotary=rotary, impl=impl)
    for key in {layer.attention.mask_key for layer in model.layers.values()}:
        lm = layer_mask(model, key, fm.num_keys, device)
        inputs.layer_masks[key] = lm
        if causal_fast is not None and lm.trivial:
            continue
        if impl == "block_sparse" and lm.layout is not None:
            inputs.pairs[key] = model.layouts.pairs(key, lm, seq)
        elif impl == "flex":
            heads = lm.layout.shape[0] if lm.layout is not None else model.cfg.num_attention_heads
            inputs.block_masks[key] = paths.flex_block_mask(fm, lm, heads, device, compiled=device.type == "cuda")
    return inputs


def layer_mask(model, key: tuple, num_keys: int, device: torch.device) -> LayerMask:
    window = model.cfg.sliding_window_width
    if key[0] == GLOBAL:
        return LayerMask(window=window)
    block = model.layouts.params(key).block
    nb = -(-num_keys // block)
    return LayerMask(window=window, layout=model.layouts(key, nb, device)[0], block=block)


def forward_mask(model, batch, seq, positions, segment_ids, kv_cache, device) -> ForwardMask:
    pos_emb = model.pos_emb
    q_pos = k_pos = positions
    key_valid, q_offset, num_keys = None, 0, seq
    if kv_cache is not None:
        if segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with a KV cache; use left padding for batched prompts")
        k_pos = kv_cache.record_positions(q_pos, batch)
        q_offset = kv_cache.slot if hasattr(kv_cache, "slot") else kv_cache.length
        num_keys = kv_cache.max_len if hasattr(kv_cache, "slot") else kv_cache.length + seq
        if kv_cache.has_padding:
            key_valid = kv_cache.key_valid[:batch, :num_keys]
    has_bias = pos_emb in ("alibi", "rpe")
    per_row = segment_ids is not None or key_valid is not None or (has_bias and max(q_pos.shape[0], k_pos.shape[0]) > 1)
    bm = batch if per_row else 1
    fm = ForwardMask(q_offset=q_offset, num_queries=seq, num_keys=num_keys, batch=bm)
    if segment_ids is not None:
        fm.set_segments(segment_ids.expand(bm, seq))
    fm.key_valid = key_valid
    if has_bias:
        as_type = torch.float32 if pos_emb == "alibi" else torch.long
        fm.q_pos = q_pos.expand(bm, q_pos.shape[1]).to(as_type)
        fm.k_pos = k_pos.expand(bm, k_pos.shape[1]).to(as_type)
    if pos_emb == "alibi":
        one = torch.ones(1, 1, dtype=torch.long, device=device)
        # through the module, so a tensor-parallel shard's head slice (a forward hook) applies
        fm.alibi_slopes = -model.alibi(one, one * 0)[0, :, 0, 0]
    elif pos_emb == "rpe":
        fm.rpe = (model.rpe_num_buckets, model.rpe_max_distance)
    return fm
