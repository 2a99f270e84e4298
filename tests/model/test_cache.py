"""KV-cache decoding must reproduce a full forward pass exactly, for every positional encoding and GQA."""

import pytest
import torch

from neox.config.schema import POS_EMBS, ModelConfig
from neox.errors import NeoxError
from neox.model import GPT, KVCache
from neox.model.cache import StaticKVCache

V, T = 97, 12


def tiny(pos_emb, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=V, seq_length=16, pos_emb=pos_emb, **kw
    )
    return GPT(cfg).eval()


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("kind", [KVCache, StaticKVCache])
def test_prefill_then_decode_equals_full_forward(pos_emb, kv_heads, kind):
    model = tiny(pos_emb, num_kv_heads=kv_heads, rotary_pct=0.5)
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        full = model(x)
        # the static cache is longer than needed: its unwritten slots must stay invisible
        cache = kind.for_model(model, batch_size=2, max_len=T if kind is KVCache else T + 4)
        steps = [model(x[:, :5], kv_cache=cache)]
        for i in range(5, T):
            steps.append(model(x[:, i : i + 1], kv_cache=cache))
    if kind is StaticKVCache:
        assert cache.k[0].shape[2] == T + 4 and cache.sync_length() == T
    assert cache.length == T
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("kind", [KVCache, StaticKVCache])
def test_left_padded_batch_matches_unpadded_rows(pos_emb, kind):
    model = tiny(pos_emb, num_kv_heads=2)
    pad, prompt = 3, 8
    x = torch.randint(1, V, (2, T))
    # row 0 is x[0, :T-pad] shifted right behind `pad` padding tokens; row 1 is unpadded
    padded = x.clone()
    padded[0, pad:], padded[0, :pad] = x[0, : T - pad], 0
    attention_mask = torch.ones(2, T, dtype=torch.long)
    attention_mask[0, :pad] = 0
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = kind.for_model(model, batch_size=2, max_len=T)
        cache.mark_padding(attention_mask[:, :prompt])
        out = [model(padded[:, :prompt], positions[:, :prompt], kv_cache=cache)]
        for i in range(prompt, T):
            out.append(model(padded[:, i : i + 1], positions[:, i : i + 1], kv_cache=cache))
        out = torch.cat(out, 1)
        ref0 = model(x[:1, : T - pad])
        ref1 = model(x[1:])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, pad:], ref0[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref1[0], atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error():
    model = tiny("rotary")
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(NeoxError, match="max_len"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_positions_beyond_the_tables_are_a_clear_error():
    model = tiny("rotary")  # max_position_embeddings = seq_length = 16
    cache = KVCache.for_model(model, batch_size=1, max_len=20)
    with pytest.raises(NeoxError, match="max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long), kv_cache=cache)


def test_cache_dtype_follows_autocast_and_reset():
    model = tiny("alibi")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache.for_model(model, batch_size=1, max_len=6)
        assert cache.k[0].dtype == torch.bfloat16
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    assert cache.length == 3 and cache.k[0].shape == (1, 4, 6, 8)
    cache.mark_padding(torch.tensor([[0, 1]]))
    assert cache.has_padding
    cache.reset()
    assert cache.length == 0 and not cache.has_padding and bool(cache.key_valid.all())


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
@pytest.mark.parametrize("mode", ["autocast", "pure"])
def test_bf16_cached_decoding_tracks_full_forward(pos_emb, mode):
    model = tiny(pos_emb, num_kv_heads=2)
    if mode == "pure":
        model = model.to(torch.bfloat16)
    x = torch.randint(0, V, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        full = model(x)
        cache = KVCache.for_model(model, batch_size=2, max_len=8)
        steps = [model(x[:, :4], kv_cache=cache)] + [model(x[:, i : i + 1], kv_cache=cache) for i in range(4, 8)]
    assert cache.k[0].dtype == torch.bfloat16
    assert (torch.cat(steps, 1).float() - full.float()).abs().max().item() < 0.05
