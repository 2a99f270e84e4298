"""Tokenizers behind one small interface, chosen by GPT-NeoX's ``tokenizer_type`` names.

Every tokenizer has ``encode(str) -> list[int]``, ``encode_batch(list[str]) -> list[list[int]]``,
``decode(list[int]) -> str``, ``vocab_size`` (the unpadded vocabulary), ``eod_id`` and ``pad_id``.

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

TOKENIZER_TYPES = ("HFTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer", "SPMTokenizer",
                   "TiktokenTokenizer", "ByteLevelTokenizer")
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


def _need_file(path, tokenizer_type: str, key: str = "vocab_file") -> str:
    if path is None:
        raise ConfigError(f"tokenizer.{key}: {tokenizer_type} needs a file; set tokenizer.{key} "
                          f"(--{key.replace('_', '-')})")
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer.{key}: {path}: no such file")
    return str(path)


class ByteLevelTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, plus ``<|endoftext|>`` = 256 and ``<|padding|>`` = 257. Needs no file."""

    name = "ByteLevelTokenizer"
    vocab_size = 258
    eod_id = 256
    pad_id = 257

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


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (e.g. GPT-NeoX-20B / Pythia's 20B_tokenizer.json).

    eod is ``<|endoftext|>`` and pad ``<|padding|>`` (as GPT-NeoX looks them up); files without them fall back
    to another end-of-sequence token (``</s>``, ``<|end_of_text|>``, ``<eos>``) and pad with eod. Text is encoded
    with the file's post-processor, as GPT-NeoX does (a tokenizer that adds a BOS adds it to every document).
    """

    name = "HFTokenizer"

    def __init__(self, vocab_file: str):
        from tokenizers import Tokenizer as _HF

        path = _need_file(vocab_file, self.name)
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise ConfigError(f"tokenizer.vocab_file: {path}: not a tokenizers JSON file ({e})") from None
        self._init_ids(path)
        try:
            pre = json.loads(Path(path).read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        except ValueError:
            pre = {}
        # A post-processor that adds tokens (BOS...) would add them to every piece of a cut document.
        adds = self._tok.encode("a").ids != self._tok.encode("a", add_special_tokens=False).ids
        self.splittable = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not adds

    def _init_ids(self, source: str) -> None:
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eod = next((i for i in map(self._tok.token_to_id, _EOD_CANDIDATES) if i is not None), None)
        if eod is None:
            raise ConfigError(f"tokenizer.vocab_file: {source} has none of {', '.join(_EOD_CANDIDATES)} to end "
                              f"documents with; add {EOD_TOKEN} as a special token")
        self.eod_id = eod
        pad = self._tok.token_to_id(PAD_TOKEN)
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

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as _HF
        from tokenizers import decoders, models, pre_tokenizers

        vocab = _need_file(vocab_file, self.name)
        merges = _need_file(merge_file, self.name, "merge_file")
        try:
            model = models.BPE.from_file(vocab, merges)
        except Exception as e:
            raise ConfigError(f"tokenizer.vocab_file: {vocab} / {merges}: not a GPT-2 vocab.json + merges.txt "
                              f"pair ({e})") from None
        tok = _HF(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOD_TOKEN) is not None:
            # Registered as special so "<|endoftext|>" in text maps to one id, as the tokenizer JSON does.
            tok.add_special_tokens([EOD_TOKEN])
        self._tok = tok
        self._init_ids(vocab)
        self.splittable = True


class SPMTokenizer(Tokenizer):
    """A sentencepiece model. eod is ``<|endoftext|>`` when the model has it, else the model's eos."""

    name = "SPMTokenizer"
    splittable = False

    def __init__(self, vocab_file: str):
        import sentencepiece as spm

        path = _need_file(vocab_file, self.name)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"tokenizer.vocab_file: {path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        eod = self._sp.piece_to_id(EOD_TOKEN)
        if eod == self._sp.unk_id() or self._sp.id_to_piece(eod) != EOD_TOKEN:
            eod = self._sp.eos_id()
        if eod < 0:
            raise ConfigError(f"tokenizer.vocab_file: {path} has neither {EOD_TOKEN} nor an eos piece; "
                              f"train it with --eos_id or a {EOD_TOKEN} user symbol")
        self.eod_id = eod
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else eod

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


# Pre-tokenizer regexes of the public tiktoken encodings (facts of those formats, as tiktoken defines them).
_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
               r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
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
    """

    name = "TiktokenTokenizer"

    def __init__(self, vocab_file: str):
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
        self._enc = tiktoken.Encoding(name=stem, pat_str=pat, mergeable_ranks=ranks,
                                      special_tokens={EOD_TOKEN: eod})
        self.vocab_size = self._enc.n_vocab
        self.eod_id = self.pad_id = eod
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
    by_lower = {t.lower(): t for t in TOKENIZER_TYPES}
    canonical = by_lower.get(str(kind).lower())
    if canonical is None:
        raise ConfigError(f"tokenizer.tokenizer_type: unknown tokenizer {kind!r}; choose one of "
                          f"{', '.join(TOKENIZER_TYPES)}")
    if canonical == "HFTokenizer":
        return HFTokenizer(vocab)
    if canonical == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab, merges)
    if canonical == "SPMTokenizer":
        return SPMTokenizer(vocab)
    if canonical == "TiktokenTokenizer":
        return TiktokenTokenizer(vocab)
    if canonical == "CharLevelTokenizer":
        return CharLevelTokenizer()
    return ByteLevelTokenizer()
