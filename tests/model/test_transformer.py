"""The GPT as a whole: residual math, weight tying, names and counts, precision, pipeline stages, training."""

import math

import pytest
import torch
import torch.nn.functional as F

from neox.config.schema import ModelConfig
from neox.errors import ConfigError
from neox.model import GPT, num_params

V = 61


def cfg_of(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=V, seq_length=16)
    return ModelConfig(**{**base, **kw})


def build(**kw):
    torch.manual_seed(0)
    return GPT(cfg_of(**kw))


def manual_attention(attn, x):
    """Causal multi-head attention from the fused per-head [q, k, v] rows, written out (no GQA, no pos_emb)."""
    b, t, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    qkv = (x @ attn.query_key_value.weight.T + attn.query_key_value.bias).view(b, t, heads, 3, hd)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * hd)
    return out @ attn.dense.weight.T + attn.dense.bias


@pytest.mark.parametrize("parallel,tied_norm", [(False, False), (True, False), (True, True)])
def test_residual_math_one_layer(parallel, tied_norm):
    model = build(num_layers=1, pos_emb="none", gpt_j_residual=parallel, gpt_j_tied=tied_norm)
    with torch.no_grad():  # non-trivial norms so that using the wrong one would show
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    layer = model.layers["0"]
    x = torch.randint(0, V, (2, 7))
    h = model.embed_in(x)
    ln1 = layer.input_layernorm
    if parallel:
        ln2 = ln1 if tied_norm else layer.post_attention_layernorm
        out = h + manual_attention(layer.attention, ln1(h)) + layer.mlp(ln2(h))
    else:
        mid = h + manual_attention(layer.attention, ln1(h))
        out = mid + layer.mlp(layer.post_attention_layernorm(mid))
    want = model.final_layer_norm(out) @ model.embed_in.weight.T
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    assert (layer.post_attention_layernorm is None) == tied_norm


def test_tied_and_untied_output_layer():
    tied, untied = build(), build(no_weight_tying=True)
    assert "embed_out.weight" not in tied.state_dict()
    assert untied.state_dict()["embed_out.weight"].shape == (V, 32)
    x = torch.randint(0, V, (2, 5))
    tied(x).sum().backward()
    # the tied matrix gets gradient from the lookup rows and from the output projection (every row)
    assert bool((tied.embed_in.weight.grad.abs().sum(1) > 0).all())
    assert num_params(cfg_of(no_weight_tying=True)) - num_params(cfg_of()) == V * 32


def test_parameter_names_follow_the_contract():
    names = set(build(pos_emb="rpe", activation="swiglu", no_weight_tying=True).state_dict())
    for n in (
        "embed_in.weight",
        "layers.1.input_layernorm.weight",
        "layers.1.post_attention_layernorm.bias",
        "layers.1.attention.query_key_value.weight",
        "layers.1.attention.dense.bias",
        "layers.1.attention.rpe.relative_attention_bias.weight",
        "layers.1.mlp.w1.weight",
        "layers.1.mlp.w3.weight",
        "layers.1.mlp.w2.weight",
        "final_layer_norm.weight",
        "embed_out.weight",
    ):
        assert n in names
    assert "embed_pos.weight" in build(pos_emb="learned").state_dict()


VARIANTS = [
    dict(),
    dict(pos_emb="learned", norm="rmsnorm", activation="swiglu", use_bias_in_norms=False),
    dict(pos_emb="sinusoidal", norm="scalenorm", activation="relu"),
    dict(pos_emb="alibi", num_kv_heads=2, activation="geglu", gpt_j_residual=True),
    dict(pos_emb="rpe", activation="mish", gpt_j_residual=True, gpt_j_tied=True, no_weight_tying=True),
    dict(pos_emb="none", activation="reglu", use_bias_in_attn_linear=False, use_bias_in_mlp=False),
    dict(rotary_pct=0.25, activation="silu", num_kv_heads=1, intermediate_size=48, max_position_embeddings=32),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) or "default")
def test_variant_counts_and_trains(variant):
    model = build(**variant)
    assert num_params(cfg_of(**variant)) == sum(p.numel() for p in model.parameters())
    torch.manual_seed(1)
    batch = torch.randint(0, V, (4, 17))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_overfits_a_small_batch():
    model = build(hidden_size=64, num_layers=2)
    torch.manual_seed(2)
    batch = torch.randint(0, V, (2, 17))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi", "rpe"])
def test_bf16_autocast_and_pure_bf16(pos_emb):
    model = build(pos_emb=pos_emb, num_kv_heads=2).eval()
    x = torch.randint(0, V, (2, 12))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(x)
    auto.float().sum().backward()
    assert model.embed_in.weight.grad.dtype == torch.float32
    pure = model.to(torch.bfloat16)(x)
    assert pure.dtype == torch.bfloat16
    for out in (auto, pure):
        assert (out.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item() + 0.05


def test_pipeline_stages_pass_hidden_states():
    full = build(num_layers=4, pos_emb="learned", no_weight_tying=True).eval()
    first, last = build(num_layers=4, pos_emb="learned", no_weight_tying=True).eval(), None
    first.load_state_dict(full.state_dict())
    last = build(num_layers=4, pos_emb="learned", no_weight_tying=True).eval()
    last.load_state_dict(full.state_dict())
    del first.layers["2"], first.layers["3"]
    first.final_layer_norm = first.embed_out = None
    del last.layers["0"], last.layers["1"]
    last.embed_in = last.embed_pos = None
    x = torch.randint(0, V, (2, 9))
    hidden = first(x)
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(last(hidden), full(x))
    assert set(last.state_dict()) >= {"layers.3.mlp.dense_4h_to_h.weight", "embed_out.weight"}


def test_matches_transformers_gpt_neox():
    transformers = pytest.importorskip("transformers")
    model = build(gpt_j_residual=True, no_weight_tying=True, rotary_pct=0.5, rotary_emb_base=1000).eval()
    hf = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            rotary_pct=0.5,
            rotary_emb_base=1000,
            max_position_embeddings=16,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
    ).eval()
    head = "lm_head.weight" if "lm_head.weight" in hf.state_dict() else "embed_out.weight"  # transformers 5 / 4
    state = {(head if k == "embed_out.weight" else "gpt_neox." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    x = torch.randint(0, V, (2, 11))
    torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(hidden_size=30), "num_attention_heads"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(rotary_pct=0.1), "rotary_pct"),
    ],
)
def test_bad_shapes_are_config_errors(kw, key):
    with pytest.raises(ConfigError, match=key):
        GPT(cfg_of(**kw))


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_meta_device_build_then_materialize(pos_emb):
    # FSDP-style: build on meta, allocate, re-init; the derived tables must come back real (not garbage)
    ref = build(pos_emb=pos_emb)
    with torch.device("meta"):
        model = GPT(cfg_of(pos_emb=pos_emb))
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    x = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(model(x), ref(x))


def test_forward_traces_without_graph_breaks():
    import torch._dynamo

    model = build(num_layers=1, pos_emb="rpe", num_kv_heads=2)
    x = torch.randint(0, V, (2, 8))
    segments = torch.tensor([[0] * 3 + [1] * 5] * 2)
    for kwargs in ({}, {"segment_ids": segments}):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x, **kwargs)
        assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("kw", [dict(hidden_dropout=0.5), dict(attention_dropout=0.5)])
def test_dropout_only_in_training_mode(kw):
    model = build(**kw)
    x = torch.randint(0, V, (2, 8))
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
