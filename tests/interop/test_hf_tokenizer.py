"""Tokenizers across the HF boundary: sentencepiece export encodes like neox, declared special tokens are read."""

import io
import json
import random
from types import SimpleNamespace as NS

import pytest

from neox.config import from_dict
from neox.data.tokenizers import build_tokenizer
from neox.errors import NeoxError
from neox.interop import spm_model
from neox.interop.hf_tokenizer import declared_special_tokens, export_tokenizer, find_tokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  indented line   \n\ttab\r\n"
    "unicode: naïve café — 東京 🙂\n12345 678,9 end"
)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "and",
    "cat",
    "runs",
    "far",
    "away",
    "from",
    "home",
    "every",
    "day",
]


def _train_spm(path, model_type, normalization):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {i}" for i in range(300)] + [TEXT]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=420,
        model_type=model_type,
        user_defined_symbols=["<|endoftext|>"],
        byte_fallback=True,
        normalization_rule_name=normalization,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return lines


@pytest.mark.parametrize("model_type, normalization", [("unigram", "identity"), ("bpe", "nmt_nfkc")])
def test_sentencepiece_export_encodes_like_neox(tmp_path, model_type, normalization):
    lines = _train_spm(tmp_path / "m.model", model_type, normalization)
    tok = build_tokenizer(NS(tokenizer_type="SPMTokenizer", vocab_file=str(tmp_path / "m.model")))
    export_tokenizer(tok, tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    texts = [
        TEXT,
        " lead space",
        "a  b   c",
        "x<|endoftext|>y <|endoftext|>",
        "▁x",
        "ｆｕｌｌ　width",
        "\n\nx",
        "",
        "über 🙂",
    ] + lines[:20]
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text), text
    assert hf.decode(tok.encode(lines[0])) == tok.decode(tok.encode(lines[0]))
    assert hf.eos_token_id == tok.eod_id and hf.pad_token_id == tok.pad_id
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (tmp_path / "m.model").read_bytes()
    # and back: the exported directory imports as a tokenizer that gives the same ids
    group = find_tokenizer(tmp_path / "out")
    group.update(declared_special_tokens(tmp_path / "out", group))
    back = build_tokenizer(from_dict({"tokenizer": group}).tokenizer)
    assert back.encode(TEXT) == tok.encode(TEXT) and back.eod_id == tok.eod_id


def test_model_proto_reader_agrees_with_sentencepiece(tmp_path):
    _train_spm(tmp_path / "m.model", "bpe", "identity")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    proto = spm_model.read_model_proto((tmp_path / "m.model").read_bytes())
    assert len(proto.pieces) == sp.get_piece_size()
    assert [p.piece for p in proto.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [p.score for p in proto.pieces] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert [i for i, p in enumerate(proto.pieces) if p.type == spm_model.CONTROL] == [sp.bos_id(), sp.eos_id()]
    assert [p.type for p in proto.pieces].count(spm_model.BYTE) == 256
    assert proto.trainer_spec.model_type == spm_model.BPE and proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.precompiled_charsmap
    with pytest.raises(NeoxError, match="cannot read its protobuf"):
        spm_model.read_model_proto(b"\x0a\xff\xff")


@pytest.mark.parametrize("name", ["gpt2.tiktoken", "ranks.tiktoken"])  # r50k regex; cl100k regex (possessive)
def test_tiktoken_export_encodes_like_neox(tmp_path, shared_data, name):
    import base64

    from neox.interop.hf_tokenizer import _byte_to_unicode

    # GPT-2's ranks as a .tiktoken file: vocab.json's byte-level strings turned back into bytes
    byte_of = {ch: b for b, ch in _byte_to_unicode().items()}
    vocab = json.loads((shared_data / "tokenizers/gpt2-vocab.json").read_text(encoding="utf-8"))
    (tmp_path / name).write_text(
        "".join(
            f"{base64.b64encode(bytes(byte_of[c] for c in t)).decode()} {i}\n"
            for t, i in vocab.items()
            if t != "<|endoftext|>"
        )
    )
    tok = build_tokenizer(NS(tokenizer_type="TiktokenTokenizer", vocab_file=str(tmp_path / name)))
    export_tokenizer(tok, tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = (shared_data / "corpora/wikitext-2/valid.txt").read_text(encoding="utf-8")[:20000] + TEXT
    text += " 1904 12345678 <|endoftext|>  x\r\n\t "
    ids = tok.encode(text)
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == text and hf.eos_token_id == tok.eod_id == 50256


def test_declared_special_tokens_in_priority_order(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "<|im_end|>": 1, "<pad>": 2, "</s>": 3}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json")
    )
    group = find_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [3, 1], "pad_token_id": 2}))
    assert declared_special_tokens(tmp_path, group) == {"eod_token": "</s>", "pad_token": "<pad>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert declared_special_tokens(tmp_path, group) == {"eod_token": "<|im_end|>", "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": None}))
    assert declared_special_tokens(tmp_path, group)["eod_token"] == "</s>"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(NeoxError, match="tokenizer_config.json: not valid JSON"):
        declared_special_tokens(tmp_path, group)
