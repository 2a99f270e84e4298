"""The GPT: embeddings, a ModuleDict of blocks, final norm and output layer (names as in docs/architecture.md).

Pipeline stages may set `embed_in`, `embed_pos`, `final_layer_norm` or `embed_out` to None and delete
entries of `layers`: forward then takes hidden states instead of ids (no embed_in) and returns hidden
states instead of logits (no final_layer_norm, or no output layer left).
"""

from __future__ import annotations

import torch
from torch import nn

from neox.config.schema import ModelConfig
from neox.errors import NeoxError
from neox.model import info, mup
from neox.model.attention import Attention, AttentionInputs, SparseLayouts, build_attention_inputs
from neox.model.init import init_weights
from neox.model.layers import MLP, build_norm
from neox.model.moe import MoE, is_moe_layer
from neox.model.positional import ALiBi, RotaryEmbedding, SinusoidalEmbedding


class Block(nn.Module):
    """Sequential: x + attn(ln1(x)), then + mlp(ln2(.)).
    Parallel (gpt_j_residual): x + attn(ln1(x)) + mlp(ln2(x)); gpt_j_tied uses ln1 for both."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.parallel = cfg.gpt_j_residual
        self.input_layernorm = build_norm(cfg)
        tied_norm = cfg.gpt_j_residual and cfg.gpt_j_tied
        self.post_attention_layernorm = None if tied_norm else build_norm(cfg)
        self.attention = Attention(cfg, layer_idx)
        self.mlp = MoE(cfg) if is_moe_layer(cfg, layer_idx) else MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache=None) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.dropout(self.attention(h, inputs, kv_cache))
        if self.parallel:
            if self.post_attention_layernorm is not None:
                h = self.post_attention_layernorm(x)
            return x + attn + self.dropout(self.mlp(h))
        x = x + attn
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        info.check_shapes(cfg)
        self.cfg = cfg
        self.pos_emb = cfg.pos_emb
        self.num_layers = cfg.num_layers
        self.num_kv_heads = info.num_kv_heads(cfg)
        self.head_dim = info.head_dim(cfg)
        self.rpe_num_buckets, self.rpe_max_distance = cfg.rpe_num_buckets, cfg.rpe_max_distance
        self.tied = not cfg.no_weight_tying
        h, max_pos = cfg.hidden_size, info.max_positions(cfg)
        self.max_positions = max_pos

        self.embed_in = nn.Embedding(cfg.vocab_size, h)
        self.embed_pos = nn.Embedding(max_pos, h) if cfg.pos_emb == "learned" else None
        # derived fp32 tables: non-persistent buffers, so the state dict holds only the parameters above/below
        self.sinusoidal = SinusoidalEmbedding(h, max_pos) if cfg.pos_emb == "sinusoidal" else None
        rotary_ndims = info.rotary_dims(cfg)
        self.rotary = (
            RotaryEmbedding(rotary_ndims, max_pos, cfg.rotary_emb_base, cfg.rope_scaling)
            if cfg.pos_emb == "rotary"
            else None
        )
        self.embedding_mult, self.output_mult = mup.embedding_multiplier(cfg), mup.output_multiplier(cfg)
        self.alibi = ALiBi(cfg.num_attention_heads) if cfg.pos_emb == "alibi" else None
        self.attention_impl = cfg.attention_impl
        sparse = any(kind != "global" for kind in cfg.attention_types or ())
        self.layouts = SparseLayouts(cfg) if sparse else None
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout)

        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.final_layer_norm = build_norm(cfg)
        self.embed_out = None if self.tied else nn.Linear(h, cfg.vocab_size, bias=False)
        init_weights(self, cfg)

    def head_weight(self) -> torch.Tensor | None:
        """The output layer's weight [V, H] when the head is nothing but x @ weight^T (no hooks, e.g. LoRA's,
        and no other module type), so a loss may apply it itself; else None."""
        if self.final_layer_norm is None:
            return None
        if self.embed_out is None:
            return self.embed_in.weight if self.tied and self.embed_in is not None else None
        head = self.embed_out
        if type(head) is not nn.Linear or head.bias is not None or head._forward_hooks or head._forward_pre_hooks:
            return None
        return head.weight

    def reference_param(self) -> torch.Tensor:
        """A parameter whose dtype/device stand for the whole model (any stage keeps at least one)."""
        return next(self.parameters())

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        """dtype attention runs in: the autocast dtype when autocast is on, else that of the hidden states
        (which follows FSDP's mixed-precision parameter dtype too)."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache=None,
        head: bool = True,
    ) -> torch.Tensor:
        """tokens [B, T] ids (or [B, T, H] hidden states on a stage without embed_in) -> logits [B, T, V]
        (or hidden states on a stage without the head). position_ids [B, T] default to arange (continuing
        from the cache length); segment_ids [B, T] restrict attention to tokens of the same document.
        head=False stops before the output layer, at its input (for a loss that applies `head_weight()`)."""
        x = self.embed_in(tokens) if self.embed_in is not None else tokens
        b, t = x.shape[0], x.shape[1]
        if position_ids is not None:
            pos = position_ids
        elif kv_cache is not None:
            pos = kv_cache.next_positions(t)
        else:
            pos = torch.arange(t, device=x.device)[None]
        if (
            kv_cache is not None
            and not kv_cache.positions_checked
            and self.pos_emb in ("learned", "sinusoidal", "rotary")
            and not torch.compiler.is_compiling()
        ):
            # generation is where positions outgrow the tables; checked only here to keep training sync-free
            # (a compiled decode step cannot sync: its caller checks the whole range before the first step)
            last = int(pos.max())
            if last >= self.max_positions:
                raise NeoxError(
                    f"position {last} is beyond model.max_position_embeddings={self.max_positions} "
                    f"of this {self.pos_emb} model; shorten the prompt or the number of new tokens"
                )
        if self.embed_in is not None:
            if self.embed_pos is not None:
                x = x + self.embed_pos(pos)
            elif self.sinusoidal is not None:
                x = x + self.sinusoidal(pos).to(x.dtype)
            if self.embedding_mult != 1.0:
                x = x * self.embedding_mult
            x = self.embed_dropout(x)

        inputs = build_attention_inputs(self, b, t, pos, segment_ids, kv_cache, self.compute_dtype(x), x.device)
        for layer in self.layers.values():
            x = layer(x, inputs, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(t)

        if self.final_layer_norm is None:
            return x
        x = self.final_layer_norm(x)
        if self.output_mult != 1.0:  # muP's logit multiplier, on the head's input (the head has no bias)
            x = x * self.output_mult
        if not head:
            return x
        if self.embed_out is not None:
            return self.embed_out(x)
        if self.tied and self.embed_in is not None:
            return nn.functional.linear(x, self.embed_in.weight)
        return x
