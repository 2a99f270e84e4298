"""Tokenizers across the Hugging Face boundary.

Export: the `tokenizers.Tokenizer` equivalent of a neox tokenizer, saved so `AutoTokenizer.from_pretrained(OUT)`
encodes like neox. Import: copy a model directory's tokenizer files and read which tokens it declares as
end-of-sequence and padding, so the generated config names them (`tokenizer.eod_token` / `pad_token`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from neox.data.tokenizers import EOD_TOKEN, PAD_TOKEN
from neox.errors import NeoxError
from neox.interop import spm_model

# -- export --------------------------------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of byte-level BPE vocabularies):
    printable Latin-1 bytes map to themselves, the rest to code points from 256 upward in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_hf_tokenizer(eod: str, pad: str):
    """A tokenizers.Tokenizer giving neox ByteLevelTokenizer's ids: byte b -> id b, then eod, pad."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eod, special=True), AddedToken(pad, special=True)])
    return tok


def _sentencepiece_hf_tokenizer(tokenizer):
    """A tokenizers.Tokenizer with a sentencepiece model's ids (unigram or BPE), built by transformers' own
    converter from the model's pieces, scores and normalizer settings."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = spm_model.read_model_proto(tokenizer._sp.serialized_model_proto())
    kind = proto.trainer_spec.model_type
    if kind == spm_model.UNIGRAM:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    elif kind == spm_model.BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        raise NeoxError(
            f"tokenizer.vocab_file: sentencepiece model_type {kind} (word/char) has no Hugging Face "
            "equivalent here (unigram and bpe export); export with --no-tokenizer"
        )
    # legacy=True puts the dummy prefix on the whole text, as sentencepiece does, also when the normalizer has
    # already removed leading spaces (the "first" scheme then adds none).
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    # Control and unknown pieces are special tokens for HF (eos/bos/unk; skipped by decode(skip_special_tokens)).
    tok.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in proto.pieces
            if p.type in (spm_model.UNKNOWN, spm_model.CONTROL)
        ]
    )
    return tok


def _tiktoken_hf_tokenizer(tokenizer):
    """A byte-level BPE with a tiktoken file's ids: transformers' TikTokenConverter derives the merges from the
    ranks; the same pre-tokenizer regex; <|endoftext|> at neox's eod id (which may leave a gap, as cl100k's)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # Oniguruma (the tokenizers library's regex engine) reads "X{1,3}+" as a repeated repeat, where tiktoken's
    # engine means a possessive repeat: spell that as an atomic group, which means the same in both.
    pattern = re.sub(r"(\\p\{\w+\}|\\.|\[[^\]]*\]|[^\\])(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", tokenizer.pattern)
    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(tokenizer.vocab_file)
    vocab[EOD_TOKEN] = tokenizer.endoftext_id
    # whole pre-tokens found in the vocabulary are taken as they are, as tiktoken does before merging
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    return tok


def hf_tokenizer_object(tokenizer):
    """The `tokenizers.Tokenizer` equivalent of a neox tokenizer, or a NeoxError naming the type."""

    inner = getattr(tokenizer, "_tok", None)  # HFTokenizer / GPT2BPETokenizer wrap a tokenizers.Tokenizer
    if inner is not None:
        return inner
    if tokenizer.name == "ByteLevelTokenizer":
        return _byte_level_hf_tokenizer(EOD_TOKEN, PAD_TOKEN)
    if tokenizer.name == "SPMTokenizer":
        return _sentencepiece_hf_tokenizer(tokenizer)
    if tokenizer.name == "TiktokenTokenizer":
        return _tiktoken_hf_tokenizer(tokenizer)
    raise NeoxError(
        f"tokenizer.tokenizer_type={tokenizer.name} has no Hugging Face tokenizer equivalent; "
        "export with --no-tokenizer and supply a tokenizer yourself"
    )


# What the exported tokenizer_config.json says, whichever transformers wrote it: a class name that 4.x and 5.x
# both load (5.x writes "TokenizersBackend", which 4.x does not have); no token_type_ids, which the causal models'
# generate() refuses; left padding, so a batch of prompts is continued from its last real token.
PORTABLE_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_input_names": ["input_ids", "attention_mask"],
    "padding_side": "left",
}


def export_tokenizer(tokenizer, out: Path, obj=None, max_length: int | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json so AutoTokenizer.from_pretrained(out) works in transformers
    4.x and 5.x (plus tokenizer.model, the original, for a sentencepiece tokenizer). `max_length` (the model's
    context) becomes model_max_length."""
    from transformers import PreTrainedTokenizerFast

    obj = obj if obj is not None else hf_tokenizer_object(tokenizer)
    eod = obj.id_to_token(tokenizer.eod_id)
    specials = dict(bos_token=eod, eos_token=eod, unk_token=eod, pad_token=obj.id_to_token(tokenizer.pad_id))
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:  # sentencepiece keeps its own bos / unk
        specials.update(
            unk_token=sp.id_to_piece(sp.unk_id()), bos_token=sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        )
    # neox's byte-level and tiktoken tokenizers read "<|endoftext|>" in text as plain text; HF-JSON ones match it.
    # sentencepiece matches its user-defined pieces inside the text (the Split pre-tokenizer does that here):
    # cutting the text at special tokens first would give every piece after one its own dummy prefix "▁".
    literal = tokenizer.name in ("ByteLevelTokenizer", "SPMTokenizer", "TiktokenTokenizer")
    portable = dict(PORTABLE_TOKENIZER_CONFIG, **({"model_max_length": max_length} if max_length else {}))
    init = {k: v for k, v in portable.items() if k != "tokenizer_class"}
    fast = PreTrainedTokenizerFast(tokenizer_object=obj, split_special_tokens=literal, **init, **specials)
    fast.save_pretrained(str(out))
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, **portable}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if sp is not None:
        (Path(out) / "tokenizer.model").write_bytes(sp.serialized_model_proto())


# -- import --------------------------------------------------------------------------------------------------


def find_tokenizer(model_dir: Path) -> dict:
    """The tokenizer config group (type and files, in model_dir) for a model directory's tokenizer files."""
    if (model_dir / "tokenizer.json").is_file():
        return {"tokenizer_type": "HFTokenizer", "vocab_file": str((model_dir / "tokenizer.json").resolve())}
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        return {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": str((model_dir / "vocab.json").resolve()),
            "merge_file": str((model_dir / "merges.txt").resolve()),
        }
    if (model_dir / "tokenizer.model").is_file():
        return {"tokenizer_type": "SPMTokenizer", "vocab_file": str((model_dir / "tokenizer.model").resolve())}
    raise NeoxError(f"{model_dir}: no tokenizer.json, vocab.json+merges.txt or tokenizer.model to import")


def copy_tokenizer(group: dict, out: Path) -> dict:
    """Copy a group's tokenizer files into out; returns the group pointing at the copies."""
    moved = dict(group)
    for key in ("vocab_file", "merge_file"):
        if key in group:
            target = out / Path(group[key]).name
            shutil.copy(group[key], target)
            moved[key] = str(target.resolve())
    return moved


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise NeoxError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer files write it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_to_token(group: dict):
    """id -> token text for the tokenizer files of a `find_tokenizer` group (None when out of range)."""
    path = group["vocab_file"]
    if group["tokenizer_type"] == "HFTokenizer":
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(path).id_to_token
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise NeoxError(f"{path}: not a tokenizers JSON file ({e})") from None
    if group["tokenizer_type"] == "GPT2BPETokenizer":
        by_id = {i: t for t, i in _read_json(Path(path)).items() if isinstance(i, int)}
        return by_id.get
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise NeoxError(f"{path}: not a sentencepiece model ({e})") from None
    return lambda i: sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None


def declared_special_tokens(model_dir: Path, group: dict) -> dict:
    """{"eod_token": ..., "pad_token": ...} as the directory declares them: tokenizer_config.json's eos_token /
    pad_token first (what AutoTokenizer reports), then special_tokens_map.json, then config.json's ids."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(model_dir / name)
        for theirs, ours in (("eos_token", "eod_token"), ("pad_token", "pad_token")):
            token = _token_text(data.get(theirs))
            if token is not None:
                found.setdefault(ours, token)
    config = _read_json(model_dir / "config.json")
    lookup = None
    for theirs, ours in (("eos_token_id", "eod_token"), ("pad_token_id", "pad_token")):
        value = config.get(theirs)
        value = value[0] if isinstance(value, list) and value else value  # several eos ids: the first ends text
        if ours in found or not isinstance(value, int) or isinstance(value, bool):
            continue
        lookup = lookup or _id_to_token(group)
        token = lookup(value)
        if token is not None:
            found[ours] = token
    return found
