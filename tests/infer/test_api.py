import pytest
import torch

import neox
from neox.errors import NeoxError
from neox.infer.generate import generate
from tests.infer.tiny import greedy_reference, greedy_shortfall, make_run, random_model, tiny_config


def test_load_returns_model_with_generate(tmp_path):
    cfg = tiny_config(num_kv_heads=2, generation={"maximum_tokens": 6, "temperature": 0.0})
    original = random_model(cfg)
    make_run(tmp_path / "run", cfg, original, iteration=3)
    model, tok = neox.load(tmp_path / "run")
    greedy = lambda ids, n: greedy_reference(original, ids, n, eod_id=tok.eod_id)  # noqa: E731
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))
    text = model.generate("hello")  # settings from the checkpoint's generation group: 6 greedy tokens
    assert isinstance(text, str) and text == model.generate("hello")
    assert text == tok.decode(greedy(tok.encode("hello"), 6))
    assert len(model.generate([[104, 105]], max_new_tokens=4)[0]) <= 4
    assert model.generate([[104, 105]], max_new_tokens=4) == [greedy([104, 105], 4)]
    assert len(model.generate(["a", "bcd"], max_new_tokens=3)) == 2
    assert model.generate(["a", "bcd"], max_new_tokens=3) == [
        tok.decode(greedy(tok.encode(p), 3)) for p in ["a", "bcd"]
    ]
    assert model.generate([""], max_new_tokens=3) == [tok.decode(greedy([tok.eod_id], 3))]  # from the EOD token
    assert model.num_layers == 2  # attributes fall through to the GPT
    assert generate(model, [[104, 105]], 4).tokens == [greedy_reference(original, [104, 105], 4)]  # unwrapped
    bf16, _ = neox.load(tmp_path / "run" / "iter_0000003", dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16 and isinstance(bf16.generate("x"), str)
    out = bf16.generate([tok.encode("x")])[0]
    assert greedy_shortfall(bf16, tok.encode("x"), out, 6, tok.eod_id) <= 2**-7  # a bf16 near-tie may flip


def test_missing_tokenizer_file_is_named(tmp_path):
    cfg = tiny_config(tokenizer={"tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "tok.json")})
    (tmp_path / "tok.json").write_text("{}")  # only needs to exist while the config is built
    make_run(tmp_path / "run", cfg)
    (tmp_path / "tok.json").unlink()
    with pytest.raises(NeoxError, match="tokenizer.vocab_file"):
        neox.load(tmp_path / "run")
