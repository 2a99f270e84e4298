"""Chat SFT data: JSONL conversations (``{"messages": [{"role", "content"}, ...]}``) rendered by a Jinja chat
template into a text dataset and a label dataset (-100 everywhere but the assistant turns), as GPT-NeoX's
``preprocess_data_with_chat_template.py`` does.

Which tokens belong to which turn is found by rendering growing prefixes of the conversation: the text the
template adds for turn i is ``render(messages[: i + 1])`` minus ``render(messages[:i])``. For a turn of the
trained role the prefix is rendered with ``add_generation_prompt=True``, so the role header the template
writes before the answer ("<|im_start|>assistant\\n") is context, not target, exactly what generation will
feed the model. Each piece is tokenized on its own, so a token never straddles a turn boundary and the label
mask is exact (the price: a boundary can tokenize differently from the whole string, as it does in GPT-NeoX).

Templates come from a file (``--chat-template FILE``) or from the ``chat_template`` of the
``tokenizer_config.json`` next to the tokenizer file (``--chat-template tokenizer``). They run in Jinja's
sandbox with the names Hugging Face templates use (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neox.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from neox.data.preprocess import IGNORE_INDEX, Summary
from neox.data.readers import iter_json_lines, json_line_error
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError, DataError

FROM_TOKENIZER = "tokenizer"


@dataclass
class ChatOptions:
    inputs: list
    output_prefix: str
    template: str  # a file, or "tokenizer": tokenizer_config.json beside tokenizer.vocab_file
    key: str = "messages"
    generation_role: str = "assistant"
    only_last_turn: bool = False  # train on the final turn only
    no_mask: bool = False  # train on every token (the label dataset equals the text)
    append_eod: bool = True  # end each conversation with EOD, a target when the last turn is trained
    dtype: str | None = None


class ChatTemplate:
    """A compiled chat template; ``render(messages, add_generation_prompt)`` gives the text."""

    def __init__(self, source: str, where: str, special: dict | None = None):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.where = where
        self.special = dict(special or {})
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ConfigError(f"{where}: not a valid Jinja chat template: {e}") from None

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as e:
            raise DataError(f"{self.where}: the chat template failed: {e}") from None

    def segments(self, messages: list, generation_role: str) -> list[tuple[str, bool]]:
        """(text, is a turn of generation_role) pieces whose concatenation is the whole rendered chat."""
        out, done = [], ""
        for i, turn in enumerate(messages):
            if turn["role"] == generation_role:
                header = self.render(messages[:i], add_generation_prompt=True)
                out.append((_suffix(header, done, self.where, i), False))
                done = header
            text = self.render(messages[: i + 1])
            out.append((_suffix(text, done, self.where, i), turn["role"] == generation_role))
            done = text
        return out


def _suffix(text: str, prefix: str, where: str, turn: int) -> str:
    if not text.startswith(prefix):
        raise ConfigError(
            f"{where}: rendering turn {turn} changes the text before it; a chat template must render a "
            "conversation as the concatenation of its turns (this one is not prefix-stable)"
        )
    return text[len(prefix) :]


def load_template(spec: str, vocab_file: str | None) -> ChatTemplate:
    """The template of ``--chat-template``: a Jinja file, or ``tokenizer`` for tokenizer_config.json's."""
    if spec != FROM_TOKENIZER:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--chat-template: {spec}: no such file (a Jinja template, or 'tokenizer')")
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    if not vocab_file:
        raise ConfigError("--chat-template tokenizer: needs --vocab-file (the tokenizer.json beside its config)")
    config = Path(vocab_file).parent / "tokenizer_config.json"
    if not config.is_file():
        raise ConfigError(f"--chat-template tokenizer: {config} does not exist; give a template file instead")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{config}: {json_line_error(e)}") from None
    source = data.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        raise ConfigError(f"{config}: has no chat_template; give a template file with --chat-template FILE")
    special = {k: _token_text(data.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return ChatTemplate(source, str(config), {k: v for k, v in special.items() if v is not None})


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _messages(obj, key: str, where: str) -> list:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = obj.get(key)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: key {key!r} must be a non-empty list of {{role, content}} messages")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {key}[{j}] must be an object with string 'role' and 'content'")
    return messages


def encode_chat(tok, template: ChatTemplate, messages: list, opts: ChatOptions) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) of one conversation; labels are -100 where no loss is taken."""
    pieces = template.segments(messages, opts.generation_role)
    last_turn = max((i for i, (_, trained) in enumerate(pieces) if trained), default=-1)
    tokens, labels = [], []
    for i, (text, trained) in enumerate(pieces):
        ids = tok.encode(text) if text else []
        keep = opts.no_mask or (trained and (not opts.only_last_turn or i == last_turn))
        tokens.extend(ids)
        labels.extend(ids if keep else [IGNORE_INDEX] * len(ids))
    if opts.append_eod:
        # the EOD is a target when the turn before it is: the model learns to stop after its answer
        tokens.append(tok.eod_id)
        labels.append(tok.eod_id if labels and labels[-1] != IGNORE_INDEX else IGNORE_INDEX)
    return np.asarray(tokens, dtype=np.int64), np.asarray(labels, dtype=np.int32)


def preprocess_chat(opts: ChatOptions, tokenizer_cfg) -> Summary:
    """Write ``{prefix}_{key}_document`` and ``{prefix}_{key}_label_document`` (the label_data_paths input)."""
    tok = build_tokenizer(tokenizer_cfg)
    template = load_template(opts.template, getattr(tokenizer_cfg, "vocab_file", None))
    dtype = np.dtype(opts.dtype) if opts.dtype else best_fitting_dtype(tok.vocab_size)
    paths = {
        opts.key: f"{opts.output_prefix}_{opts.key}_document",
        "label": f"{opts.output_prefix}_{opts.key}_label_document",
    }
    text_b = IndexedDatasetBuilder(paths[opts.key], dtype)
    label_b = IndexedDatasetBuilder(paths["label"], np.int32)
    summary = Summary(dtype=dtype.name)
    start = time.perf_counter()
    try:
        for where, obj, raw in iter_json_lines(opts.inputs):
            tokens, labels = encode_chat(tok, template, _messages(obj, opts.key, where), opts)
            text_b.add_document(tokens.astype(dtype))
            label_b.add_document(labels)
            summary.documents += 1
            summary.tokens += len(tokens)
            summary.bytes += len(raw)
        if summary.documents == 0:
            raise DataError(f"--input {','.join(map(str, opts.inputs))}: no conversations to write")
        text_b.finalize()
        label_b.finalize()
    except BaseException:
        text_b.abort()
        label_b.abort()
        raise
    summary.seconds = time.perf_counter() - start
    summary.outputs = paths
    return summary
