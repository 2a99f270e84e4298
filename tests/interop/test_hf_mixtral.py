"""MoE models to and from transformers' MixtralForCausalLM: logits, greedy generation with the KV cache, weights
both ways (4.x per-expert and 5.x fused layouts), and one-line refusals for what Mixtral cannot express."""

import pytest
import torch

import neox
from neox.data.tokenizers import build_tokenizer
from neox.errors import NeoxError
from neox.infer.generate import generate
from neox.interop.hf import export_checkpoint, import_hf
from neox.interop.hf_mapping import ExportError, hf_architecture
from tests.infer.tiny import greedy_reference, random_model, tiny_config
from tests.interop import hf_tiny
from tests.interop.hf_tiny import transformers

MIXTRAL_LIKE = dict(
    {k: v for k, v in hf_tiny.LLAMA_LIKE.items() if k != "use_bias_in_mlp"},
    intermediate_size=96,
    moe_num_experts=4,
    moe_top_k=2,
    moe_router_type="topk",
    moe_topk_renormalize=True,
    moe_aux_loss_coeff=0.02,
)


def test_moe_generation_with_kv_cache_equals_full_recompute():
    cfg = tiny_config(**MIXTRAL_LIKE)
    model = random_model(cfg)
    cached = generate(model, hf_tiny.PROMPTS, 10).tokens
    assert cached == generate(model, hf_tiny.PROMPTS, 10, recompute=True).tokens
    assert cached == [greedy_reference(model, p, 10) for p in hf_tiny.PROMPTS]


def test_export_matches_mixtral_logits_and_greedy_generation(tmp_path):
    cfg = tiny_config(**MIXTRAL_LIKE)
    model = random_model(cfg)
    tok = build_tokenizer(cfg.tokenizer)
    hf = hf_tiny.export_and_load(cfg, model, tmp_path, tok)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert (hf.config.num_local_experts, hf.config.num_experts_per_tok) == (4, 2)
    assert hf.config.router_aux_loss_coef == pytest.approx(0.01)  # per-choice f: neox's coefficient / k
    assert hf_tiny.logits_gap(model, hf, hf_tiny.random_ids(2, 24, seed=1)) < 1e-4
    hf_tiny.assert_greedy_matches_hf(model, hf, tok)


def _random_mixtral(seed: int = 0):
    conf = transformers.MixtralConfig(
        **hf_tiny.HF_TINY,
        intermediate_size=96,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return hf_tiny.random_hf(transformers.MixtralForCausalLM, conf, seed=seed)


def test_import_from_mixtral_then_export_round_trips(tmp_path):
    hf = _random_mixtral()
    hf_tiny.save_hf(hf, tmp_path / "hf")  # 5.x writes the fused gate_up_proj / down_proj layout
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, _tok = neox.load(run)
    assert model.cfg.model.moe_num_experts == 4 and model.cfg.model.moe_topk_renormalize
    assert hf_tiny.logits_gap(model, hf, hf_tiny.random_ids(2, 16, seed=2, high=384)) < 1e-4
    # export writes 4.x's per-expert names; transformers loads them back into the same fused tensors
    export_checkpoint(run, tmp_path / "back")
    back = hf_tiny.load_hf(tmp_path / "back")
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change,option",
    [
        (dict(moe_router_type="sinkhorn"), "moe_router_type"),
        (dict(moe_topk_renormalize=False), "moe_topk_renormalize"),
        (dict(moe_expert_interval=2), "moe_expert_interval"),
        (dict(moe_num_shared_experts=1), "moe_num_shared_experts"),
        (dict(moe_token_dropping=True), "moe_token_dropping"),
        (dict(norm="layernorm"), "norm"),
        (dict(activation="gelu"), "activation"),
    ],
)
def test_moe_configs_mixtral_cannot_express_are_one_line_errors(change, option):
    cfg = tiny_config(**{**MIXTRAL_LIKE, **change})
    with pytest.raises(ExportError, match=rf"^model\.{option}=.* cannot be exported to MixtralForCausalLM: ") as e:
        hf_architecture(cfg.model)
    assert "\n" not in str(e.value)


def test_mixtral_jitter_does_not_import(tmp_path):
    hf = _random_mixtral()
    hf.config.router_jitter_noise = 0.1
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(NeoxError, match="router_jitter_noise"):
        import_hf(tmp_path / "hf", tmp_path / "run")
