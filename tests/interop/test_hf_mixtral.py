"""MoE models to and from transformers' MixtralForCausalLM: logits, greedy generation with the KV cache, weights
both ways (4.x per-expert and 5.x fused layouts), and one-line refusals for what Mixtral cannot express."""

import pytest
import torch

from neox.errors import NeoxError
from neox.infer.generate import generate
from neox.interop.hf import export_checkpoint, export_model, import_hf
from neox.interop.hf_mapping import ExportError, hf_architecture
from tests.infer.tiny import greedy_reference, random_model, tiny_config

transformers = pytest.importorskip("transformers")

from neox.data.tokenizers import build_tokenizer  # noqa: E402

MIXTRAL_LIKE = dict(
    norm="rmsnorm",
    activation="swiglu",
    num_kv_heads=2,
    use_bias_in_attn_linear=False,
    use_bias_in_norms=False,
    no_weight_tying=True,
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
    prompts = [[5, 6, 7, 8, 9], [70, 71]]
    cached = generate(model, prompts, 10).tokens
    assert cached == generate(model, prompts, 10, recompute=True).tokens
    assert cached == [greedy_reference(model, p, 10) for p in prompts]


def test_export_matches_mixtral_logits_and_greedy_generation(tmp_path):
    cfg = tiny_config(**MIXTRAL_LIKE)
    model = random_model(cfg)
    tok = build_tokenizer(cfg.tokenizer)
    export_model(cfg, model.state_dict(), tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert (hf.config.num_local_experts, hf.config.num_experts_per_tok) == (4, 2)
    assert hf.config.router_aux_loss_coef == pytest.approx(0.01)  # per-choice f: neox's coefficient / k
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    prompts = [[5, 6, 7, 8, 9], [70, 71]]
    ours = generate(model, prompts, 8, eod_id=tok.eod_id).tokens
    pad = tok.pad_id
    input_ids = torch.tensor([[pad] * (5 - len(p)) + p for p in prompts])
    mask = (torch.arange(5)[None] >= torch.tensor([5 - len(p) for p in prompts])[:, None]).long()
    out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row, theirs in zip(ours, out[:, 5:].tolist()):
        theirs = theirs[: theirs.index(tok.eod_id)] if tok.eod_id in theirs else theirs
        assert row == theirs


def _random_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    conf = transformers.MixtralConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = transformers.MixtralForCausalLM(conf).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def test_import_from_mixtral_then_export_round_trips(tmp_path):
    hf = _random_mixtral()
    hf.save_pretrained(tmp_path / "hf")  # 5.x writes the fused gate_up_proj / down_proj layout
    cfg = tiny_config()
    from neox.interop.hf_tokenizer import export_tokenizer

    export_tokenizer(build_tokenizer(cfg.tokenizer), tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run")

    import neox

    model, _tok = neox.load(run)
    assert model.cfg.model.moe_num_experts == 4 and model.cfg.model.moe_topk_renormalize
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    # export writes 4.x's per-expert names; transformers loads them back into the same fused tensors
    export_checkpoint(run, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
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
