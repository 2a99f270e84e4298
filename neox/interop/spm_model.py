"""Read the parts of a sentencepiece model file that a Hugging Face tokenizer is built from.

A `.model` file is a protocol-buffers `ModelProto`. The `protobuf` package is not a dependency here, so this
reads the wire format directly, and only the fields that describe how text is encoded. Field numbers and
defaults are sentencepiece's (sentencepiece_model.proto): pieces = 1 (piece 1, score 2, type 3),
trainer_spec = 2 (model_type 3, byte_fallback 35, unk_id 40, unk_piece 45), normalizer_spec = 3
(precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5).
The result has the attribute shape of the generated protobuf classes, which transformers' converter reads.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

from neox.errors import NeoxError

# ModelProto.SentencePiece.Type and TrainerSpec.ModelType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) for each field of one message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v  # negative int32s are ten-byte two's-complement varints


def read_model_proto(data: bytes) -> SimpleNamespace:
    """pieces (piece, score, type), trainer_spec and normalizer_spec of a serialized sentencepiece model."""
    pieces = []
    trainer = SimpleNamespace(model_type=UNIGRAM, byte_fallback=False, unk_id=0, unk_piece="<unk>")
    normalizer = SimpleNamespace(
        precompiled_charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True, escape_whitespaces=True
    )
    try:
        for number, value in _fields(data):
            if number == 1:
                piece = SimpleNamespace(piece="", score=0.0, type=NORMAL)
                for n, v in _fields(value):
                    if n == 1:
                        piece.piece = v.decode("utf-8")
                    elif n == 2:
                        piece.score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        piece.type = v
                pieces.append(piece)
            elif number == 2:
                for n, v in _fields(value):
                    if n == 3:
                        trainer.model_type = v
                    elif n == 35:
                        trainer.byte_fallback = bool(v)
                    elif n == 40:
                        trainer.unk_id = _int32(v)
                    elif n == 45:
                        trainer.unk_piece = v.decode("utf-8")
            elif number == 3:
                for n, v in _fields(value):
                    if n == 2:
                        normalizer.precompiled_charsmap = bytes(v)
                    elif n in (3, 4, 5):
                        setattr(
                            normalizer,
                            {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[n],
                            bool(v),
                        )
    except (IndexError, ValueError, struct.error) as e:
        raise NeoxError(f"sentencepiece model: cannot read its protobuf ({e})") from None
    return SimpleNamespace(pieces=pieces, trainer_spec=trainer, normalizer_spec=normalizer)
