"""Self-attention over a fused qkv projection, and the masks/biases shared by all layers of one forward pass.

The fused projection's output rows are grouped per key/value group: [q_0 .. q_{g-1}, k, v] heads for group 0,
then group 1, ... (g = query heads per kv head). Without GQA this is HF GPTNeoX's per-head [q, k, v]
interleave, and a tensor-parallel column split by kv groups keeps each rank's heads whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.schema import ModelConfig
from neox.model import mup
from neox.model.info import head_dim, num_kv_heads
from neox.model.positional import RelativePositionBias, apply_rotary, t5_relative_bucket


@dataclass
class AttentionInputs:
    """Everything attention needs that does not depend on the layer; built once per forward.

    mask: None (use is_causal or attend to everything), a bool [B|1, 1, T, S] (True = may attend), or an
    additive float [B|1, H|1, T, S] in the compute dtype (with ALiBi folded in, or to be added to a layer's
    T5 bias). rotary: (cos, sin) broadcastable over the fused qkv view.
    """

    is_causal: bool
    mask: torch.Tensor | None
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    rpe_buckets: torch.Tensor | None


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> 0 where allowed, -inf where not (every row keeps at least its own key, so no NaN)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = num_kv_heads(cfg)
        self.group = self.num_heads // self.num_kv_heads
        self.head_dim = head_dim(cfg)
        self.dropout = cfg.attention_dropout
        h, bias = cfg.hidden_size, cfg.use_bias_in_attn_linear
        self.query_key_value = nn.Linear(h, self.num_kv_heads * (self.group + 2) * self.head_dim, bias=bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.query_scale = mup.query_scale(cfg)  # muP's 1/head_dim softmax scale, folded into the queries
        self.rpe = None
        if cfg.pos_emb == "rpe":
            self.rpe = RelativePositionBias(cfg.rpe_num_buckets, cfg.rpe_max_distance, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        g, hd = self.group, self.head_dim
        # head counts come from the tensor (-1), so a tensor-parallel shard holding some kv groups works too
        qkv = self.query_key_value(x).view(b, t, -1, g + 2, hd)
        qk = qkv[:, :, :, : g + 1]
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

        mask = inputs.mask
        if self.rpe is not None:
            mask = self.rpe(inputs.rpe_buckets).to(q.dtype) + mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=inputs.is_causal and mask is None,
            enable_gqa=g > 1,
        )
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


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
    q_pos = k_pos = positions
    pos_emb = model.pos_emb
    rotary = model.rotary(q_pos, dtype) if pos_emb == "rotary" else None
    has_bias = pos_emb in ("alibi", "rpe")
    if kv_cache is not None:
        if segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with a KV cache; use left padding for batched prompts")
        k_pos = kv_cache.record_positions(q_pos, batch)
        allowed = kv_cache.visible(seq, batch, always=has_bias)
        if allowed is None:
            # a fresh sequence is plain causal; one decoded token with nothing to hide sees every cached key
            return AttentionInputs(is_causal=kv_cache.length == 0, mask=None, rotary=rotary, rpe_buckets=None)
    elif has_bias or segment_ids is not None:
        slot = torch.arange(seq, device=device)
        allowed = (slot[None, :] <= slot[:, None])[None, None]  # [1, 1, T, T]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    else:
        return AttentionInputs(is_causal=True, mask=None, rotary=rotary, rpe_buckets=None)

    rpe_buckets = None
    if pos_emb == "alibi":
        mask = (model.alibi(q_pos, k_pos) + additive(allowed, torch.float32)).to(dtype)
    elif pos_emb == "rpe":
        rpe_buckets = t5_relative_bucket(
            k_pos[:, None, :] - q_pos[:, :, None], model.rpe_num_buckets, model.rpe_max_distance
        )
        mask = additive(allowed, dtype)
    else:
        mask = allowed
    return AttentionInputs(is_causal=False, mask=mask, rotary=rotary, rpe_buckets=rpe_buckets)
