"""Positional encodings against their formulas (and HF GPTNeoX's rotary)."""

import math

import pytest
import torch

from neox.config import from_dict
from neox.config.schema import ModelConfig
from neox.errors import ConfigError
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


# -- RoPE scaling: each method by its formula (plain Python, float64) and against transformers -------------


def inv_freq_by_formula(d, base, s):
    """Per-frequency definitions of transformers' rope_scaling methods, one frequency at a time."""
    out = []
    orig = s.get("original_max_position_embeddings")
    for i in range(d // 2):
        f = base ** (-2 * i / d)
        kind = s["type"]
        if kind == "linear":
            f = f / s["factor"]
        elif kind == "llama3":
            lo, hi = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
            wavelen = 2 * math.pi / f
            if wavelen > orig / lo:
                f = f / s["factor"]
            elif wavelen >= orig / hi:
                smooth = (orig / wavelen - lo) / (hi - lo)
                f = (1 - smooth) * f / s["factor"] + smooth * f
        elif kind == "yarn":
            fast, slow = s.get("beta_fast", 32), s.get("beta_slow", 1)

            def dim_at(rot):
                return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

            low, high = max(math.floor(dim_at(fast)), 0), min(math.ceil(dim_at(slow)), d - 1)
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep, 1: divide by the factor
            f = f * (1 - ramp) + f / s["factor"] * ramp
        out.append(f)
    return out


SCALINGS = [
    {"type": "linear", "factor": 4.0},
    {
        "type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    {
        "rope_type": "llama3",
        "factor": 2.0,
        "original_max_position_embeddings": 32,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
    },
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: f"{s.get('type', s.get('rope_type'))}-{s['factor']:g}")
def test_rope_scaling_tables_match_formula(scaling):
    d, base, max_pos = 32, 10000.0, 256
    s = {"type": scaling.get("type", scaling.get("rope_type")), **scaling}
    rope = RotaryEmbedding(d, max_positions=max_pos, base=base, scaling=scaling)
    freqs = inv_freq_by_formula(d, base, s)
    mscale = 0.1 * math.log(s["factor"]) + 1 if s["type"] == "yarn" else 1.0
    positions = torch.tensor([[0, 1, 5, 63, 64, 200, 255]])
    cos, sin = rope(positions, torch.float32)
    for j, p in enumerate(positions[0].tolist()):
        want = torch.tensor([math.cos(p * f) * mscale for f in freqs] * 2)
        torch.testing.assert_close(cos[0, j, 0, 0].double(), want.double(), atol=2e-5, rtol=1e-5)
        want = torch.tensor([math.sin(p * f) * mscale for f in freqs] * 2)
        torch.testing.assert_close(sin[0, j, 0, 0].double(), want.double(), atol=2e-5, rtol=1e-5)


def test_dynamic_ntk_rescales_the_base_past_the_original_context():
    d, base, orig, factor = 16, 10000.0, 32, 2.0
    rope = RotaryEmbedding(
        d, 128, base, {"type": "dynamic", "factor": factor, "original_max_position_embeddings": orig}
    )
    plain = RotaryEmbedding(d, 128, base)
    short = torch.arange(32)[None]
    torch.testing.assert_close(rope(short, torch.float32), plain(short, torch.float32))  # inside: unchanged
    long = torch.arange(100)[None]
    cos, _ = rope(long, torch.float32)
    grown = base * (factor * 100 / orig - (factor - 1)) ** (d / (d - 2))
    for p in (0, 7, 99):
        want = [math.cos(p * grown ** (-2 * i / d)) for i in range(d // 2)] * 2
        torch.testing.assert_close(cos[0, p, 0, 0].double(), torch.tensor(want).double(), atol=2e-5, rtol=1e-5)


def _hf_rope(rope_parameters, max_pos, head_dim=32, heads=2):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )
    return llama.LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: f"{s.get('type', s.get('rope_type'))}-{s['factor']:g}")
def test_rope_scaling_matches_transformers(scaling):
    max_pos = 256
    hf = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    hf_rope = _hf_rope(hf, max_pos)
    positions = torch.tensor([[0, 3, 17, 64, 130, 255]])
    want_cos, want_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = RotaryEmbedding(32, max_pos, 10000, scaling)(positions, torch.float32)
    torch.testing.assert_close(cos[:, :, 0, 0], want_cos, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sin[:, :, 0, 0], want_sin, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("length", [40, 200])
def test_dynamic_ntk_matches_transformers(length):
    # transformers' dynamic type grows from its max_position_embeddings, neox's from original_max_position_embeddings
    orig, factor = 64, 4.0
    hf_rope = _hf_rope({"rope_type": "dynamic", "factor": factor}, orig)
    positions = torch.arange(length)[None]
    want_cos, want_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions)
    scaling = {"type": "dynamic", "factor": factor, "original_max_position_embeddings": orig}
    cos, sin = RotaryEmbedding(32, 256, 10000, scaling)(positions, torch.float32)
    torch.testing.assert_close(cos[:, :, 0, 0], want_cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin[:, :, 0, 0], want_sin, atol=1e-5, rtol=1e-5)


def test_yarn_attention_factor_options():
    s = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
    pos = torch.tensor([[0]])
    for extra, want in (
        ({}, 0.1 * math.log(8.0) + 1),
        ({"attention_factor": 0.5}, 0.5),
        ({"mscale": 2.0, "mscale_all_dim": 1.0}, (0.2 * math.log(8.0) + 1) / (0.1 * math.log(8.0) + 1)),
    ):
        cos, _ = RotaryEmbedding(16, 128, 10000, {**s, **extra})(pos, torch.float32)
        assert cos[0, 0, 0, 0, 0].item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"type": "ntk", "factor": 2.0}, "type 'ntk' is not one of linear, dynamic, llama3, yarn"),
        ({"type": "linear"}, "linear scaling needs a factor"),
        ({"type": "linear", "factor": 0.5}, "factor must be at least 1"),
        ({"type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}, "yarn scaling has no key 'low_freq_factor'"),
        ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "must be larger than"),
        ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "disagree"),
        ({"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": "long"}, "positive integer"),
        ("linear", "expected a mapping"),
    ],
)
def test_rope_scaling_errors_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message) as e:
        from_dict({"rope_scaling": bad})
    assert "\n" not in str(e.value) and "rope_scaling" in str(e.value)


def test_rope_scaling_needs_rotary_and_reaches_the_model():
    with pytest.raises(ConfigError, match="needs pos_emb: rotary"):
        from_dict({"pos_emb": "alibi", "rope_scaling": {"type": "linear", "factor": 2.0}})
    cfg = from_dict({"vocab_size": 64, "rope_scaling": {"type": "linear", "factor": 2.0}})
    model = GPT(cfg.model)
    torch.testing.assert_close(model.rotary.cos[10], RotaryEmbedding(16, 128, 10000).cos[5])  # positions halved
