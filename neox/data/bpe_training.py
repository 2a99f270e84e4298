"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on JSONL/text files (`neox tokenizer train`).

The result is a tokenizer JSON for ``tokenizer_type: HFTokenizer`` with ``<|endoftext|>`` = 0 (EOD) and
``<|padding|>`` = 1, the layout of GPT-NeoX-20B's tokenizer, and the GPT-2 byte-level pre-tokenizer, so
preprocessing may split long documents for it (see neox.data.tokenizers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from neox.data.readers import BadLine, expand_inputs, iter_pieces, json_line_error
from neox.data.tokenizers import EOD_TOKEN, PAD_TOKEN
from neox.errors import ConfigError, DataError, ensure_dir

SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _texts(paths: list, keys: list, text_mode: str, skipped: list) -> Iterator[str]:
    for piece in iter_pieces(paths, text_mode, segment_chars=1 << 16, splittable=True, bad=skipped):
        if not piece.is_json:
            yield piece.data
            continue
        try:
            obj = json.loads(piece.data.decode("utf-8"))
        except UnicodeDecodeError as e:
            skipped.append(BadLine(piece.path, piece.line, f"invalid UTF-8 at byte {e.start}"))
            continue
        except ValueError as e:
            skipped.append(BadLine(piece.path, piece.line, json_line_error(e)))
            continue
        for key in keys:
            value = obj.get(key) if isinstance(obj, dict) else None
            if isinstance(value, str):
                yield value
            else:
                skipped.append(BadLine(piece.path, piece.line, f"no string value for key {key!r}"))


def train_tokenizer(
    inputs, vocab_size: int, out: str, json_keys=("text",), min_frequency: int = 2, text_mode: str = "paragraph"
) -> tuple:
    """Train and save; returns (tokenizer, skipped BadLines)."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size: {vocab_size} is below {MIN_VOCAB} (256 bytes + special tokens)")
    paths = expand_inputs(inputs)
    ensure_dir(os.path.dirname(os.path.abspath(out)), "--out's folder")  # before training, not after
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    skipped: list = []
    texts = 0

    def counted():
        nonlocal texts
        for text in _texts(paths, list(json_keys), text_mode, skipped):
            texts += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if texts == 0:  # a tokenizer learned from nothing would be written and used without complaint
        raise DataError(
            f"{', '.join(map(str, inputs))}: no text to train on ({len(skipped)} lines skipped); "
            f"check the files and --json-keys ({' '.join(json_keys)})"
        )
    tmp = out + ".tmp"
    tok.save(tmp)
    os.replace(tmp, out)
    return tok, skipped
