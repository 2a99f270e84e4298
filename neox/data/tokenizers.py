"""Tokenizers behind one small interface, chosen by GPT-NeoX's ``tokenizer_type`` names.

Every tokenizer has ``encode(str) -> list[int]``, ``encode_batch(list[str]) -> list[list[int]]``,
``decode(list[int]) -> str``, ``vocab_size`` (the unpadded vocabulary), ``eod_id`` and ``pad_id``.

``eod_token`` / ``pad_token`` (TokenizerConfig) name the end-of-document and padding tokens for the tokenizer
types that read a vocabulary file; unset, each type looks up its usual names. A name missing from the vocabulary
is a ConfigError naming the key and the file.

``splittable`` says whether ``encode(a + b) == encode(a) + encode(b)`` whenever ``a`` ends in a newline that
follows a non-space character and ``b`` starts with a non-space character. Byte-level BPE with the GPT-2
pre-tokenizer regex has that property (no pre-token crosses such a boundary), so preprocessing may cut a huge
document there and encode the pieces in parallel; sentencepiece does not (it prefixes each call with "▁").
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path

from neox.errors import ConfigError

TOKENIZER_TYPES = (
    "HFTokenizer",
    "GPT2BPETokenizer",
    "CharLevelTokenizer",
    "SPMTokenizer",
    "TiktokenTokenizer",
    "ByteLevelTokenizer",
)
EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>")


class Tokenizer(abc.ABC):
    """The interface. Subclasses set name, vocab_size, eod_id, pad_id and implement encode/decode."""

    name: str = "Tokenizer"
    vocab_size: int
    eod_id: int
    pad_id: int
    splittable: bool = True

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of one text."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of a sequence of token ids."""

    def limit_threads(self, n: int) -> None:
        """Use at most n threads per encode_batch call (preprocessing workers already run in parallel)."""
        self.threads = n

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, eod_id={self.eod_id}, pad_id={self.pad_id})"


def _unknown_token(key: str, token: str, source: str, hint: str = "") -> ConfigError:
    return ConfigError(
        f"tokenizer.{key}: {token!r} is not a token of {source}{hint}; set tokenizer.{key} to one "
        "of its tokens, or unset it for the default lookup"
    )


def _fixed_specials(tokenizer: Tokenizer, eod_token, pad_token, names: dict[str, int]) -> None:
    """For file-less tokenizers: only their own special tokens can be named (by name, or not at all)."""
    for key, token in (("eod_token", eod_token), ("pad_token", pad_token)):
        if token is None:
            continue
        if token not in names:
            have = (
                ", ".join(f"{n} = {i}" for n, i in names.items())
                or f"eod {tokenizer.eod_id} and pad {tokenizer.pad_id}, without names"
            )
            raise ConfigError(
                f"tokenizer.{key}: {token!r}: {tokenizer.name} has fixed special tokens ({have}); "
                f"unset tokenizer.{key} or use a tokenizer file"
            )
        setattr(tokenizer, key.replace("_token", "_id"), names[token])


def _need_file(path, tokenizer_type: str, key: str = "vocab_file") -> str:
    if path is None:
        raise ConfigError(
            f"tokenizer.{key}: {tokenizer_type} needs a file; set tokenizer.{key} (--{key.replace('_', '-')})"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer.{key}: {path}: no such file")
    return str(path)


class ByteLevelTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, plus ``<|endoftext|>`` = 256 and ``<|padding|>`` = 257. Needs no file."""

    name = "ByteLevelTokenizer"
    vocab_size = 258
    eod_id = 256
    pad_id = 257

    def __init__(self, eod_token: str | None = None, pad_token: str | None = None):
        _fixed_specials(self, eod_token, pad_token, self._named_specials())

    def _named_specials(self) -> dict[str, int]:
        return {EOD_TOKEN: 256, PAD_TOKEN: 257}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class CharLevelTokenizer(ByteLevelTokenizer):
    """GPT-NeoX's CharLevelTokenizer: ids are the UTF-8 bytes of the text, vocab 512, eod 0, pad 1.

    (As in GPT-NeoX, eod/pad share ids with the bytes NUL and SOH, which real text does not contain.)
    GPT-NeoX decodes each id with ``chr`` (after clamping to >= 32, which turns newlines into spaces and
    breaks multi-byte characters); here decoding reverses encoding exactly instead.
    """

    name = "CharLevelTokenizer"
    vocab_size = 512
    eod_id = 0
    pad_id = 1

    def _named_specials(self) -> dict[str, int]:
        return {}  # GPT-NeoX gives its eod/pad ids no token names


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (e.g. GPT-NeoX-20B / Pythia's 20B_tokenizer.json).

    eod is ``<|endoftext|>`` and pad ``<|padding|>`` (as GPT-NeoX looks them up); files without them fall back
    to another end-of-sequence token (``</s>``, ``<|end_of_text|>``, ``<eos>``) and pad with eod. Text is encoded
    with the file's post-processor, as GPT-NeoX does (a tokenizer that adds a BOS adds it to every document).
    """

    name = "HFTokenizer"

    def __init__(self, vocab_file: str, eod_token: str | None = None, pad_token: str | None = None):
        from tokenizers import Tokenizer as _HF

        path = _need_file(vocab_file, self.name)
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise ConfigError(f"tokenizer.vocab_file: {path}: not a tokenizers JSON file ({e})") from None
        self._init_ids(path, eod_token, pad_token)
        try:
            pre = json.loads(Path(path).read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        except ValueError:
            pre = {}
        # A post-processor that adds tokens (BOS...) would add them to every piece of a cut document.
        adds = self._tok.encode("a").ids != self._tok.encode("a", add_special_tokens=False).ids
        self.splittable = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not adds

    def _init_ids(self, source: str, eod_token: str | None, pad_token: str | None) -> None:
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eod_token is not None:
            eod = self._tok.token_to_id(eod_token)
            if eod is None:
                raise _unknown_token("eod_token", eod_token, source)
        else:
            eod = next((i for i in map(self._tok.token_to_id, _EOD_CANDIDATES) if i is not None), None)
            if eod is None:
                raise ConfigError(
                    f"tokenizer.vocab_file: {source} has none of {', '.join(_EOD_CANDIDATES)} to end "
                    f"documents with; set tokenizer.eod_token to its end-of-text token"
                )
        self.eod_id = eod
        pad = self._tok.token_to_id(pad_token or PAD_TOKEN)
        if pad is None and pad_token is not None:
            raise _unknown_token("pad_token", pad_token, source)
        self.pad_id = eod if pad is None else pad

    def limit_threads(self, n: int) -> None:
        # The library's thread pool is process-wide and sized once; its switch is read at every batch call.
        if n <= 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets, which we never use.
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in fast(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2 BPE from ``vocab.json`` + ``merges.txt``; gives the same ids as the equivalent tokenizer JSON."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str, eod_token: str | None = None, pad_token: str | None = None):
        from tokenizers import Tokenizer as _HF
        from tokenizers import decoders, models, pre_tokenizers

        vocab = _need_file(vocab_file, self.name)
        merges = _need_file(merge_file, self.name, "merge_file")
        try:
            model = models.BPE.from_file(vocab, merges)
        except Exception as e:
            raise ConfigError(
                f"tokenizer.vocab_file: {vocab} / {merges}: not a GPT-2 vocab.json + merges.txt pair ({e})"
            ) from None
        tok = _HF(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = [t for t in dict.fromkeys((EOD_TOKEN, eod_token, pad_token)) if t and tok.token_to_id(t) is not None]
        # Registered as special so "<|endoftext|>" in text maps to one id, as the tokenizer JSON does.
        tok.add_special_tokens(specials)
        self._tok = tok
        self._init_ids(vocab, eod_token, pad_token)
        self.splittable = True


class SPMTokenizer(Tokenizer):
    """A sentencepiece model. eod is ``<|endoftext|>`` when the model has it, else the model's eos; pad is the
    model's pad piece, else eod (``eod_token`` / ``pad_token`` name other pieces)."""

    name = "SPMTokenizer"
    splittable = False

    def __init__(self, vocab_file: str, eod_token: str | None = None, pad_token: str | None = None):
        import sentencepiece as spm

        path = _need_file(vocab_file, self.name)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"tokenizer.vocab_file: {path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        if eod_token is not None:
            eod = self._piece_id("eod_token", eod_token, path)
        else:
            eod = self._piece_id(None, EOD_TOKEN, path)
            eod = self._sp.eos_id() if eod is None else eod
        if eod < 0:
            raise ConfigError(
                f"tokenizer.vocab_file: {path} has neither {EOD_TOKEN} nor an eos piece; "
                f"set tokenizer.eod_token, or train it with --eos_id or a {EOD_TOKEN} user symbol"
            )
        self.eod_id = eod
        if pad_token is not None:
            self.pad_id = self._piece_id("pad_token", pad_token, path)
        else:
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else eod

    def _piece_id(self, key: str | None, piece: str, path: str) -> int | None:
        """Id of a piece; a missing one is None, or a ConfigError for the config `key` that named it."""
        i = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(i) == piece:  # unknown pieces map to the unk id, whose piece differs
            return i
        if key is None:
            return None
        raise _unknown_token(key, piece, path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


# Pre-tokenizer regexes of the public tiktoken encodings (facts of those formats, as tiktoken defines them).
_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# name stem -> (regex, id of <|endoftext|>); any other file gets the cl100k regex and eod = highest rank + 1.
_KNOWN_TIKTOKEN = {
    "gpt2": (_R50K_PAT, 50256),
    "r50k_base": (_R50K_PAT, 50256),
    "p50k_base": (_R50K_PAT, 50256),
    "cl100k_base": (_CL100K_PAT, 100257),
}


class TiktokenTokenizer(Tokenizer):
    """A local ``.tiktoken`` file (lines of ``base64(token) rank``), loaded without network access.

    Files named like a public encoding (``cl100k_base.tiktoken``, ``r50k_base.tiktoken``, ...) get that
    encoding's regex and ``<|endoftext|>`` id; others use the cl100k regex with ``<|endoftext|>`` appended
    after the highest rank. Text is encoded as ordinary text (a literal "<|endoftext|>" is not special).
    ``eod_token`` / ``pad_token`` may name ``<|endoftext|>`` or any token of the file (its UTF-8 text).
    """

    name = "TiktokenTokenizer"

    def __init__(self, vocab_file: str, eod_token: str | None = None, pad_token: str | None = None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = _need_file(vocab_file, self.name)
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:  # tiktoken raises ValueError/binascii.Error for bad lines
            raise ConfigError(f"tokenizer.vocab_file: {path}: not a .tiktoken file ({e})") from None
        if not ranks:
            raise ConfigError(f"tokenizer.vocab_file: {path}: empty .tiktoken file")
        stem = Path(path).name.split(".")[0]
        pat, eod = _KNOWN_TIKTOKEN.get(stem, (_CL100K_PAT, max(ranks.values()) + 1))
        # kept for export: the file, its regex and the id given to <|endoftext|>
        self.vocab_file, self.pattern, self.endoftext_id = path, pat, eod
        self._enc = tiktoken.Encoding(name=stem, pat_str=pat, mergeable_ranks=ranks, special_tokens={EOD_TOKEN: eod})
        self.vocab_size = self._enc.n_vocab

        def lookup(key, token, default):
            if token is None:
                return default
            if token == EOD_TOKEN:
                return eod
            if token.encode("utf-8") not in ranks:
                raise _unknown_token(key, token, path, f" (nor {EOD_TOKEN})")
            return ranks[token.encode("utf-8")]

        self.eod_id = lookup("eod_token", eod_token, eod)
        self.pad_id = lookup("pad_token", pad_token, self.eod_id)
        self.threads = 8  # tiktoken's own default pool size for batch calls

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=self.threads)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")


def build_tokenizer(cfg) -> Tokenizer:
    """A tokenizer from a ``TokenizerConfig`` (or anything with tokenizer_type / vocab_file / merge_file)."""
    kind = getattr(cfg, "tokenizer_type", None) or "ByteLevelTokenizer"
    vocab = getattr(cfg, "vocab_file", None)
    merges = getattr(cfg, "merge_file", None)
    specials = {"eod_token": getattr(cfg, "eod_token", None), "pad_token": getattr(cfg, "pad_token", None)}
    by_lower = {t.lower(): t for t in TOKENIZER_TYPES}
    canonical = by_lower.get(str(kind).lower())
    if canonical is None:
        raise ConfigError(
            f"tokenizer.tokenizer_type: unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    if canonical == "HFTokenizer":
        return HFTokenizer(vocab, **specials)
    if canonical == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab, merges, **specials)
    if canonical == "SPMTokenizer":
        return SPMTokenizer(vocab, **specials)
    if canonical == "TiktokenTokenizer":
        return TiktokenTokenizer(vocab, **specials)
    if canonical == "CharLevelTokenizer":
        return CharLevelTokenizer(**specials)
    return ByteLevelTokenizer(**specials)
