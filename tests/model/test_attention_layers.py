"""Per-layer attention types in a whole model: every attention_impl gives the dense path's logits and gradients,
KV-cache decoding reproduces a full forward pass, and QK-layernorm is in place."""

from __future__ import annotations

import pytest
import torch

from neox.config import from_dict
from neox.config.schema import ModelConfig
from neox.errors import NeoxError
from neox.model import GPT, KVCache
from neox.model.cache import StaticKVCache

V = 53
TYPES = ["global", "local", "sparse_fixed", "bigbird", "bslongformer", "sparse_variable"]
SPARSITY = {"block": 4, "num_random_blocks": 1, "num_local_blocks": 2, "num_sliding_window_blocks": 3}


def tiny(impl="auto", pos_emb="rotary", types=TYPES, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=len(types),
        hidden_size=32,
        num_attention_heads=4,
        num_kv_heads=2,
        vocab_size=V,
        seq_length=32,
        pos_emb=pos_emb,
        attention_types=list(types),
        sparsity_config=SPARSITY,
        attention_impl=impl,
        **kw,
    )
    return GPT(cfg)


def logits_and_grads(model, x, **kw):
    model.zero_grad()
    out = model(x, **kw)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def documents(t):
    cut = [0] * 9 + [1] * (t - 15) + [2] * 6
    return torch.tensor([cut, [0] * t])


@pytest.mark.parametrize(
    "pos_emb,window,docs", [("rotary", None, False), ("alibi", 5, False), ("rpe", None, True), ("rotary", 7, True)]
)
def test_every_impl_trains_like_the_dense_path(pos_emb, window, docs):
    x = torch.randint(0, V, (2, 29))  # not a multiple of the 4-token blocks
    kw = {"segment_ids": documents(29)} if docs else {}
    ref_out, ref_grads = logits_and_grads(tiny("dense", pos_emb, sliding_window_width=window), x, **kw)
    for impl in ("auto", "chunked", "block_sparse"):
        out, grads = logits_and_grads(tiny(impl, pos_emb, sliding_window_width=window), x, **kw)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_flex_inference_on_cpu_equals_the_dense_path():
    x = torch.randint(0, V, (2, 29))
    with torch.no_grad():
        ref = tiny("dense", "alibi", sliding_window_width=6).eval()(x)
        out = tiny("flex", "alibi", sliding_window_width=6).eval()(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_training_on_cpu_is_refused():
    model = tiny("flex", "alibi")
    with pytest.raises(NeoxError, match="no backward pass on CPU"):
        model(torch.randint(0, V, (1, 8)))


@pytest.mark.parametrize("kind", [KVCache, StaticKVCache])
@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_decode_with_windows_and_layouts_equals_full_forward(kind, pos_emb):
    model = tiny("auto", pos_emb, sliding_window_width=9).eval()
    t = 22
    x = torch.randint(0, V, (2, t))
    with torch.no_grad():
        full = model(x)
        cache = kind.for_model(model, batch_size=2, max_len=t + (3 if kind is StaticKVCache else 0))
        steps = [model(x[:, :10], kv_cache=cache)]
        steps += [model(x[:, i : i + 1], kv_cache=cache) for i in range(10, t)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_on_cuda_trains_like_the_dense_path():
    x = torch.randint(0, V, (2, 29), device="cuda")
    results = []
    for impl in ("dense", "auto"):
        model = tiny(impl, "alibi", sliding_window_width=6).cuda()
        results.append(logits_and_grads(model, x, segment_ids=documents(29).cuda()))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-4, rtol=1e-4)


def test_qk_layernorm_normalises_queries_and_keys_per_head():
    model = tiny("auto", types=["global", "local"], use_qk_layernorm=True).eval()
    norm = model.layers["0"].attention.qk_layernorm
    assert [n for n, _ in model.named_parameters() if "qk_layernorm" in n] == [
        "layers.0.attention.qk_layernorm.weight",
        "layers.0.attention.qk_layernorm.bias",
        "layers.1.attention.qk_layernorm.weight",
        "layers.1.attention.qk_layernorm.bias",
    ]
    assert norm.weight.shape == (8,)  # head_dim
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        before = model(x)
        # a per-head norm makes attention blind to each query / key head's scale and offset: scale the q and k
        # rows of every head (not v) by a per-head positive factor and add a per-head constant
        for layer in model.layers.values():
            qkv = layer.attention.query_key_value
            rows = qkv.weight.view(2, 4, 8, 32)  # kv groups, [q0, q1, k, v], head_dim, hidden
            bias = qkv.bias.view(2, 4, 8)
            factor = torch.tensor([0.5, 3.0, 2.0])
            rows[:, :3] *= factor[None, :, None, None]
            bias[:, :3] *= factor[None, :, None]
            bias[:, :3] += 0.7
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    # without the norm the same change does alter the logits
    plain = tiny("auto", types=["global", "local"]).eval()
    with torch.no_grad():
        before = plain(x)
        for layer in plain.layers.values():
            layer.attention.query_key_value.weight.view(2, 4, 8, 32)[:, :3] *= 3.0
        assert not torch.allclose(plain(x), before, atol=1e-3)


def test_use_qk_layernorm_loads_from_gpt_neox_keys():
    cfg = from_dict({"use_qk_layernorm": True, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4})
    assert cfg.model.use_qk_layernorm
