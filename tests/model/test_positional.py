"""Positional encodings against their formulas (and HF GPTNeoX's rotary)."""

import math

import pytest
import torch

from neox.config.schema import ModelConfig
from neox.model import GPT
from neox.model.positional import (
    ALiBi,
    RotaryEmbedding,
    SinusoidalEmbedding,
    alibi_slopes,
    apply_rotary,
    t5_relative_bucket,
)


def rotary_by_formula(x, positions, rotary_ndims, base):
    """Pairs (i, i + d/2) of the first d dims rotate by angle p * base^(-2i/d); the rest pass through."""
    out = x.clone()
    half = rotary_ndims // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            p = float(positions[b, t])
            for i in range(half):
                theta = p * base ** (-2 * i / rotary_ndims)
                a, c = x[b, t, ..., i], x[b, t, ..., i + half]
                out[b, t, ..., i] = a * math.cos(theta) - c * math.sin(theta)
                out[b, t, ..., i + half] = c * math.cos(theta) + a * math.sin(theta)
    return out


@pytest.mark.parametrize("rotary_ndims", [8, 4])
def test_rotary_matches_formula(rotary_ndims):
    rope = RotaryEmbedding(rotary_ndims, max_positions=64, base=500)
    x = torch.randn(2, 5, 3, 2, 8)  # [B, T, groups, heads, head_dim]
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 20, 21, 40, 63]])
    cos, sin = rope(positions, torch.float32)
    got = apply_rotary(x, cos, sin)
    torch.testing.assert_close(got, rotary_by_formula(x, positions, rotary_ndims, 500), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[..., rotary_ndims:], x[..., rotary_ndims:])


def test_rotary_matches_transformers_gpt_neox_partial():
    hf = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    from transformers import GPTNeoXConfig

    head_dim, pct = 16, 0.25
    config = GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, rotary_pct=pct, rotary_emb_base=10000, max_position_embeddings=32
    )
    q, k = torch.randn(2, 4, 6, head_dim), torch.randn(2, 4, 6, head_dim)  # HF layout [B, H, T, D]
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [3, 4, 9, 10, 30, 31]])
    cos, sin = hf.GPTNeoXRotaryEmbedding(config)(q, positions)
    want_q, want_k = hf.apply_rotary_pos_emb(q, k, cos, sin)

    rope = RotaryEmbedding(int(head_dim * pct), max_positions=32, base=10000)
    c, s = rope(positions, torch.float32)  # [B, T, 1, 1, d]: move T next to D for the HF layout
    c, s = c[:, :, 0].transpose(1, 2), s[:, :, 0].transpose(1, 2)
    torch.testing.assert_close(apply_rotary(q, c, s), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rotary(k, c, s), want_k, atol=1e-5, rtol=1e-5)


def test_alibi_slopes_power_of_two_and_not():
    assert alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)])
    assert alibi_slopes(4) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    # 6 heads: the 4-head slopes, then every other 8-head slope (2^-1, 2^-3)
    assert alibi_slopes(6) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    # 12 heads: 8-head slopes then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    assert alibi_slopes(12)[8:] == pytest.approx([2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5])


def test_alibi_bias_uses_position_distance():
    bias = ALiBi(2)(torch.tensor([[5, 9]]), torch.tensor([[0, 5, 9]]))
    slopes = torch.tensor(alibi_slopes(2))
    want = -slopes[:, None, None] * torch.tensor([[5.0, 0.0, -4.0], [9.0, 4.0, 0.0]])
    torch.testing.assert_close(bias[0], want)


def test_t5_buckets_hand_worked_table():
    # num_buckets 8, max_distance 16: distances 0-3 exact; then 4 + floor(log(n/4) / log(4) * 4), capped at 7
    table = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 4, 6: 5, 7: 5, 9: 6, 11: 6, 12: 7, 15: 7, 16: 7, 100: 7}
    n = torch.tensor(list(table))
    got = t5_relative_bucket(-n, num_buckets=8, max_distance=16)  # key before query: relative = -n
    assert got.tolist() == list(table.values())
    assert t5_relative_bucket(torch.tensor([1, 5]), 8, 16).tolist() == [0, 0]  # future keys: bucket 0


def test_sinusoidal_formula():
    dim = 6
    table = SinusoidalEmbedding(dim, max_positions=10)(torch.arange(10))
    for p in (0, 3, 9):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            assert table[p, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, dim // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi", "sinusoidal"])
def test_tables_stay_fp32_and_out_of_the_state_dict(pos_emb):
    model = GPT(ModelConfig(vocab_size=64, pos_emb=pos_emb))
    tables = {k: v.clone() for k, v in model.named_buffers()}
    assert tables and not any(k in model.state_dict() for k in tables)
    model.to(torch.bfloat16)
    for name, buf in model.named_buffers():
        assert buf.dtype == torch.float32
        torch.testing.assert_close(buf, tables[name], atol=0, rtol=0)
