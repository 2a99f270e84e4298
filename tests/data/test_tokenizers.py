"""Every tokenizer type: ids, special ids, round trips, the safe-split property, and bad configs."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace as NS

import pytest

from neox.data.bpe_training import train_tokenizer
from neox.data.readers import iter_text_pieces
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "  indented line   \n\ttab\r\nwindows line\n\n\n  \nunicode: naïve café — 東京 🙂\n12345 678,9 end"
)


def tok(kind, vocab=None, merges=None, eod=None, pad=None):
    return build_tokenizer(NS(tokenizer_type=kind, vocab_file=vocab, merge_file=merges, eod_token=eod, pad_token=pad))


@pytest.fixture(scope="module")
def sample(shared_data):
    wiki = (shared_data / "corpora/wikitext-2/valid.txt").read_text(encoding="utf-8")[:20000]
    shakes = (shared_data / "corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    return wiki + shakes + TEXT


def test_gpt2_json_and_vocab_merges_give_identical_ids(shared_data, sample):
    t = shared_data / "tokenizers"
    a = tok("HFTokenizer", str(t / "gpt2.json"))
    b = tok("GPT2BPETokenizer", str(t / "gpt2-vocab.json"), str(t / "gpt2-merges.txt"))
    assert a.vocab_size == b.vocab_size == 50257
    assert a.eod_id == b.eod_id == 50256 and a.pad_id == b.pad_id == 50256  # gpt2 has no padding token
    text = sample + "<|endoftext|>tail"
    ids = a.encode(text)
    assert ids == b.encode(text)
    assert ids[-1 - len(a.encode("tail")) :] == [50256] + a.encode("tail")  # special in text: one id
    assert a.decode(ids) == b.decode(ids) == text
    assert a.encode_batch([sample, "x y"]) == [ids[: len(a.encode(sample))], a.encode("x y")]


def test_20b_tokenizer_ids(shared_data, sample):
    t = tok("hftokenizer", str(shared_data / "tokenizers/20B_tokenizer.json"))  # type names match any case
    assert (t.vocab_size, t.eod_id, t.pad_id) == (50277, 0, 1)
    assert t.decode(t.encode(sample)) == sample
    assert t.encode("          x")[0] >= 50254  # runs of spaces are single tokens in the 20B vocab


@pytest.mark.parametrize("name", ["gpt2.json", "20B_tokenizer.json"])
def test_cutting_documents_where_preprocess_does_keeps_ids(shared_data, sample, tmp_path, name):
    t = tok("HFTokenizer", str(shared_data / "tokenizers" / name))
    assert t.splittable
    path = tmp_path / "doc.txt"
    path.write_text(sample, encoding="utf-8")
    pieces = list(iter_text_pieces(str(path), "file", segment_chars=1, splittable=True, bad=[]))
    assert len(pieces) > 50 and pieces[-1].last and not pieces[0].last
    assert "".join(p.data for p in pieces) == sample
    assert [i for ids in t.encode_batch([p.data for p in pieces]) for i in ids] == t.encode(sample)


def test_trained_tokenizer(tmp_path, shared_data):
    src = tmp_path / "train.jsonl"
    src.write_text('{"text": "hello world, hello there"}\n{"text": "the world is wide"}\n{"oops": 1}\n')
    out = tmp_path / "tok.json"
    _, skipped = train_tokenizer([str(src), str(shared_data / "corpora/enwik8_first100.txt")], 400, str(out))
    assert [str(s) for s in skipped] == [f"{src}:3: no string value for key 'text'"]
    t = tok("HFTokenizer", str(out))
    assert (t.vocab_size, t.eod_id, t.pad_id) == (400, 0, 1) and t.splittable
    assert t.decode(t.encode(TEXT)) == TEXT
    assert len(t.encode("hello world")) < len("hello world")  # merges were learned
    with pytest.raises(ConfigError, match="below 258"):
        train_tokenizer([str(src)], 100, str(out))
    from neox.cli import main as cli

    assert cli(["tokenizer", "train", str(src), "--vocab-size", "300", "--out", str(tmp_path / "c.json")]) == 0
    assert tok("HFTokenizer", str(tmp_path / "c.json")).vocab_size <= 300
    assert cli(["tokenizer", "train", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", "x.json"]) == 2


def test_hf_post_processor_and_eos_fallback(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    hf = Tokenizer(models.WordLevel({"</s>": 0, "<s>": 1, "a": 2, "b": 3, "[UNK]": 4}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf.save(str(tmp_path / "bos.json"))
    t = tok("HFTokenizer", str(tmp_path / "bos.json"))
    assert (t.eod_id, t.pad_id) == (0, 0)  # no <|endoftext|>: falls back to </s>; no <|padding|>: pads with eod
    assert t.encode("a b") == [1, 2, 3] and t.encode_batch(["b"]) == [[1, 3]]  # BOS per document, as GPT-NeoX
    assert not t.splittable  # cutting a document would put a BOS in its middle
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "eot.json"))
    assert tok("HFTokenizer", str(tmp_path / "eot.json")).eod_id == 5


def test_char_and_byte_level():
    c = tok("CharLevelTokenizer")
    assert (c.vocab_size, c.eod_id, c.pad_id) == (512, 0, 1)  # GPT-NeoX's values
    assert c.encode("hé") == [104, 0xC3, 0xA9]
    assert c.decode(c.encode(TEXT)) == TEXT
    b = tok(None)  # the schema default
    assert b.name == "ByteLevelTokenizer" and (b.vocab_size, b.eod_id, b.pad_id) == (258, 256, 257)
    assert b.decode(b.encode(TEXT) + [b.eod_id]) == TEXT
    assert b.encode_batch(["a", "bc"]) == [[97], [98, 99]]


def test_sentencepiece(tmp_path):
    import sentencepiece as spm

    lines = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)] + [TEXT]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=320,
        user_defined_symbols=["<|endoftext|>"],
        byte_fallback=True,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path = tmp_path / "m.model"
    path.write_bytes(model.getvalue())
    t = tok("SPMTokenizer", str(path))
    assert t.vocab_size == 320 and not t.splittable
    assert t.eod_id == t._sp.piece_to_id("<|endoftext|>") != t._sp.unk_id()
    text = "the lazy fox jumps 🙂"
    assert t.decode(t.encode(text)) == text
    assert t.encode_batch([text, "dog"]) == [t.encode(text), t.encode("dog")]
    custom = tok("SPMTokenizer", str(path), eod="</s>", pad="<unk>")
    assert (custom.eod_id, custom.pad_id) == (t._sp.eos_id(), t._sp.unk_id())
    with pytest.raises(ConfigError, match=r"tokenizer.eod_token: '<\|im_end\|>' is not a token of .*m.model"):
        tok("SPMTokenizer", str(path), eod="<|im_end|>")


def test_tiktoken_file(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    for tok_bytes in (b"he", b"ll", b"hell", b"hello", b" w", b" wo"):
        ranks[tok_bytes] = len(ranks)
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))
    t = tok("TiktokenTokenizer", str(path))
    assert t.eod_id == 262 and t.vocab_size == 263
    assert t.encode("hello wo") == [ranks[b"hello"], ranks[b" wo"]]
    assert t.decode(t.encode(TEXT)) == TEXT
    t.limit_threads(1)
    assert t.encode_batch(["hello", "hell"]) == [[ranks[b"hello"]], [ranks[b"hell"]]]
    custom = tok("TiktokenTokenizer", str(path), eod="hello", pad="<|endoftext|>")
    assert (custom.eod_id, custom.pad_id) == (ranks[b"hello"], 262)
    with pytest.raises(ConfigError, match="tokenizer.pad_token: 'xyz' is not a token of .*tiny.tiktoken"):
        tok("TiktokenTokenizer", str(path), pad="xyz")


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="unknown tokenizer 'BertTokenizer'"):
        tok("BertTokenizer")
    with pytest.raises(ConfigError, match="HFTokenizer needs a file; set tokenizer.vocab_file"):
        tok("HFTokenizer")
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_file: .*missing.json: no such file"):
        tok("HFTokenizer", str(tmp_path / "missing.json"))
    vocab = tmp_path / "v.json"
    vocab.write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer.merge_file: GPT2BPETokenizer needs a file"):
        tok("GPT2BPETokenizer", str(vocab))
    with pytest.raises(ConfigError, match="not a tokenizers JSON file"):
        tok("HFTokenizer", str(vocab))
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        tok("SPMTokenizer", str(vocab))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(ConfigError, match="not a .tiktoken file"):
        tok("TiktokenTokenizer", str(bad))


def test_custom_eod_and_pad_tokens(tmp_path, shared_data):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"<|im_end|>": 0, "<pad>": 1, "a": 2, "b": 3, "[UNK]": 4}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "chat.json"))
    path = str(tmp_path / "chat.json")
    with pytest.raises(ConfigError, match="none of <\\|endoftext\\|>.*set tokenizer.eod_token"):
        tok("HFTokenizer", path)
    t = tok("HFTokenizer", path, eod="<|im_end|>", pad="<pad>")
    assert (t.eod_id, t.pad_id) == (0, 1) and t.encode("a b") == [2, 3]
    with pytest.raises(ConfigError, match=r"tokenizer.pad_token: '<nope>' is not a token of .*chat.json"):
        tok("HFTokenizer", path, eod="<|im_end|>", pad="<nope>")
    with pytest.raises(ConfigError, match=r"tokenizer.eod_token: '</s>' is not a token of .*chat.json"):
        tok("HFTokenizer", path, eod="</s>")

    g = shared_data / "tokenizers"
    b = tok("GPT2BPETokenizer", str(g / "gpt2-vocab.json"), str(g / "gpt2-merges.txt"), eod="\u010a", pad="!")
    assert (b.eod_id, b.pad_id) == (198, 0)  # GPT-2's newline token and "!"

    b = tok(None, eod="<|padding|>", pad="<|endoftext|>")
    assert (b.eod_id, b.pad_id) == (257, 256)
    with pytest.raises(ConfigError, match="tokenizer.eod_token: '</s>': ByteLevelTokenizer has fixed special tokens"):
        tok(None, eod="</s>")
    with pytest.raises(ConfigError, match="tokenizer.pad_token: .*CharLevelTokenizer .*eod 0 and pad 1"):
        tok("CharLevelTokenizer", pad="<|padding|>")
