import pytest
import torch

from neox.interop.hf_mapping import (
    GPTNEOX,
    LLAMA,
    ExportError,
    _fuse_qkv,
    _split_qkv,
    from_hf_config,
    hf_architecture,
    to_hf_config,
)
from tests.infer.tiny import tiny_config

LLAMA_STYLE = dict(norm="rmsnorm", activation="swiglu", use_bias_in_norms=False)


def test_architecture_choice():
    assert hf_architecture(tiny_config().model) == GPTNEOX
    assert hf_architecture(tiny_config(**LLAMA_STYLE, num_kv_heads=2).model) == LLAMA


@pytest.mark.parametrize(
    "model, option",
    [
        (dict(pos_emb="learned"), "model.pos_emb='learned'"),
        (dict(pos_emb="alibi"), "model.pos_emb='alibi'"),
        (dict(activation="swiglu"), "model.activation='swiglu'"),
        (dict(num_kv_heads=2), "model.num_kv_heads=2"),
        (dict(norm="scalenorm"), "model.norm='scalenorm'"),
        (dict(LLAMA_STYLE, gpt_j_residual=True), "model.gpt_j_residual=True"),
        (dict(LLAMA_STYLE, rotary_pct=0.5), "model.rotary_pct=0.5"),
        (dict(LLAMA_STYLE, activation="gelu"), "model.activation='gelu'"),
    ],
)
def test_unexportable_options_are_named(model, option):
    with pytest.raises(ExportError, match=option.replace("(", r"\(").replace(")", r"\)")):
        hf_architecture(tiny_config(**model).model)


def test_qkv_split_and_fuse_are_inverse_with_gqa():
    cfg = tiny_config(**LLAMA_STYLE, num_kv_heads=2).model  # 4 query heads, 2 kv heads, head_dim 16
    w = torch.randn((2 * (2 + 2)) * 16, 64)
    q, k, v = _split_qkv(w, cfg)
    assert q.shape == (64, 64) and k.shape == v.shape == (32, 64)
    # group 1's keys sit after its two query heads: rows (4 + 2) * 16 ... of the fused weight
    assert torch.equal(k[16:], w[(4 + 2) * 16 : (4 + 3) * 16])
    assert torch.equal(q[32:48], w[4 * 16 : 5 * 16])
    assert torch.equal(_fuse_qkv(q, k, v, cfg), w)


@pytest.mark.parametrize(
    "model",
    [
        dict(gpt_j_residual=True, rotary_pct=0.25, rotary_emb_base=500),
        dict(LLAMA_STYLE, num_kv_heads=2, no_weight_tying=True),
    ],
)
def test_config_round_trip(model):
    cfg = tiny_config(**model).model
    back = from_hf_config(to_hf_config(cfg))
    for key, value in back.items():
        if key not in ("use_bias_in_mlp", "use_bias_in_norms", "num_kv_heads", "seq_length"):
            assert getattr(cfg, key) == value, key
