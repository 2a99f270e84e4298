"""Export to / import from transformers: logits, greedy generation, weights and tokenizers must agree."""

import pytest
import torch

from neox.data.tokenizers import build_tokenizer
from neox.errors import NeoxError
from neox.interop.hf import export_checkpoint, export_model, import_hf
from tests.infer.tiny import make_run, random_model, tiny_config
from tests.interop import hf_tiny
from tests.interop.hf_tiny import transformers

load_file = pytest.importorskip("safetensors.torch").load_file  # installed with transformers

VARIANTS = {
    "neox_parallel_partial_rotary_tied": dict(gpt_j_residual=True, rotary_pct=0.25),
    "neox_sequential_untied_nobias_relu": dict(
        no_weight_tying=True, use_bias_in_attn_linear=False, use_bias_in_mlp=False, activation="relu"
    ),
    "neox_gptj_tied_norm": dict(gpt_j_residual=True, gpt_j_tied=True, use_bias_in_norms=False, rotary_pct=0.5),
    "llama_gqa_untied": hf_tiny.LLAMA_LIKE,
    "llama_biases_geglu_tied": dict(norm="rmsnorm", activation="geglu", use_bias_in_norms=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_model_matches_logits_and_greedy_generation(name, tmp_path):
    cfg = tiny_config(**VARIANTS[name])
    model = random_model(cfg)
    tok = build_tokenizer(cfg.tokenizer)
    hf = hf_tiny.export_and_load(cfg, model, tmp_path, tok)
    assert type(hf).__name__ == ("LlamaForCausalLM" if name.startswith("llama") else "GPTNeoXForCausalLM")
    assert hf_tiny.logits_gap(model, hf, hf_tiny.random_ids(2, 24, seed=1)) < 1e-4
    hf_tiny.assert_greedy_matches_hf(model, hf, tok)


def test_exported_byte_level_tokenizer_matches(tmp_path):
    cfg = tiny_config()
    tok = build_tokenizer(cfg.tokenizer)
    export_model(cfg, random_model(cfg).state_dict(), tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "héllo wörld\n\tdef f():  <|endoftext|> ✓"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == tok.eod_id


@pytest.mark.parametrize("kind", ["HFTokenizer", "GPT2BPETokenizer"])
def test_exported_gpt2_tokenizers_match(kind, tmp_path, shared_data):
    tdir = shared_data / "tokenizers"
    tcfg = (
        {"tokenizer_type": kind, "vocab_file": str(tdir / "gpt2.json")}
        if kind == "HFTokenizer"
        else {
            "tokenizer_type": kind,
            "vocab_file": str(tdir / "gpt2-vocab.json"),
            "merge_file": str(tdir / "gpt2-merges.txt"),
        }
    )
    cfg = tiny_config(tokenizer=tcfg, vocab_size=50304, hidden_size=32, num_layers=1)
    tok = build_tokenizer(cfg.tokenizer)
    export_model(cfg, random_model(cfg).state_dict(), tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:2000] + "<|endoftext|>"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eod_id == 50256


def test_tokenizer_without_hf_equivalent_is_refused_before_writing(tmp_path):
    cfg = tiny_config(tokenizer={"tokenizer_type": "CharLevelTokenizer"}, vocab_size=512)
    with pytest.raises(NeoxError, match="CharLevelTokenizer.*--no-tokenizer"):
        export_model(cfg, random_model(cfg).state_dict(), build_tokenizer(cfg.tokenizer), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _hf_random(kind, scale: float = 0.05):
    if kind == "pythia":
        conf = transformers.GPTNeoXConfig(
            **hf_tiny.HF_TINY,
            intermediate_size=256,
            max_position_embeddings=128,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
        return hf_tiny.random_hf(transformers.GPTNeoXForCausalLM, conf, scale=scale)
    conf = transformers.LlamaConfig(
        **hf_tiny.HF_TINY,
        num_key_value_heads=2,
        intermediate_size=160,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    return hf_tiny.random_hf(transformers.LlamaForCausalLM, conf, scale=scale)


@pytest.mark.parametrize("kind", ["pythia", "llama"])
def test_import_then_export_round_trips_weights_exactly(kind, tmp_path):
    hf = _hf_random(kind)
    hf_tiny.save_hf(hf, tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert (run / "latest").is_file() and (run / "neox.yml").is_file()
    export_checkpoint(run, tmp_path / "back")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    import neox

    model, _tok = neox.load(run)
    assert hf_tiny.logits_gap(model, hf, torch.randint(0, 256, (1, 16))) < 1e-4
    assert isinstance(model.generate("ab", max_new_tokens=4, temperature=0), str)


def test_export_checkpoint_refuses_learned_positions(tmp_path):
    cfg = tiny_config(pos_emb="learned")
    make_run(tmp_path / "run", cfg)
    with pytest.raises(NeoxError, match="pos_emb='learned'"):
        export_checkpoint(tmp_path / "run", tmp_path / "out")


def _chat_tokenizer_dir(path):
    """A tiny HF tokenizer whose only end token is <|im_end|> (none of the names neox looks up by default)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|im_end|>", "<unk>"] + [f"w{i}" for i in range(380)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>"
    ).save_pretrained(str(path))


def test_import_takes_the_declared_eos_then_loads_and_generates(tmp_path):
    import yaml

    import neox

    hf = _hf_random("llama", scale=0.0)  # the weights as transformers initialises them from seed 0
    hf.config.eos_token_id = 0
    hf.save_pretrained(tmp_path / "hf")
    _chat_tokenizer_dir(tmp_path / "hf")
    with pytest.raises(NeoxError, match="tokenizer.eod_token: '<nope>' is not a token of .*--eod-token"):
        import_hf(tmp_path / "hf", tmp_path / "bad", eod_token="<nope>")
    assert not (tmp_path / "bad").exists()

    run = import_hf(tmp_path / "hf", tmp_path / "run")
    tokenizer_group = yaml.safe_load((run / "neox.yml").read_text())["tokenizer"]
    assert tokenizer_group["eod_token"] == "<|im_end|>"
    model, tok = neox.load(run)
    assert tok.eod_id == tok.pad_id == 0
    prompt = tok.encode("w5 w9 w7")
    ours = model.generate(prompt, max_new_tokens=6, temperature=0)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=0)[0, 3:].tolist()
    assert ours == (theirs[: theirs.index(0)] if 0 in theirs else theirs)
    assert isinstance(model.generate("w1 w2", max_new_tokens=3, temperature=0), str)


def test_sharded_export_loads_in_transformers_and_imports_back(tmp_path):
    import json

    from neox.cli import main as cli

    cfg = tiny_config(num_layers=3)
    model = random_model(cfg)
    make_run(tmp_path / "run", cfg, model)
    out = tmp_path / "hf"
    assert cli(["export", "hf", str(tmp_path / "run"), str(out), "--max-shard-size", "60KB"]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards and index["metadata"]["total_size"] > 60_000

    assert hf_tiny.logits_gap(model, hf_tiny.load_hf(out), torch.randint(0, 256, (1, 16))) < 1e-4

    back = import_hf(out, tmp_path / "back")
    import neox

    again, _ = neox.load(back)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())

    export_model(cfg, model.state_dict(), None, out)  # under the default size: one file, old shards gone
    assert [p.name for p in out.glob("model*.safetensors*")] == ["model.safetensors"]
    assert cli(["export", "hf", str(tmp_path / "run"), str(tmp_path / "never"), "--max-shard-size", "lots"]) == 2
    with pytest.raises(NeoxError, match="--max-shard-size '2 GiB'"):
        export_model(cfg, model.state_dict(), None, tmp_path / "never", max_shard_size="2 GiB")
    assert not (tmp_path / "never").exists()
