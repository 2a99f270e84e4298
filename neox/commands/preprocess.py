"""`neox preprocess`: tokenize corpora into .bin/.idx datasets. Takes GPT-NeoX's preprocess_data.py flags."""

from __future__ import annotations

import argparse

from neox.data.chat import ChatOptions, preprocess_chat
from neox.data.preference import PreferenceOptions, preprocess_preferences
from neox.data.preprocess import PreprocessOptions, preprocess
from neox.data.readers import TEXT_MODES
from neox.data.tokenizers import TOKENIZER_TYPES
from neox.errors import ConfigError


def add_tokenizer_args(parser: argparse.ArgumentParser, default: str | None = "ByteLevelTokenizer") -> None:
    """--tokenizer-type / --vocab-file / --merge-file as GPT-NeoX spells them, and --eod-token / --pad-token
    (tokenizer.eod_token / pad_token); shared with `neox data`."""
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default=default, help=f"one of {', '.join(TOKENIZER_TYPES)} (default {default})")
    g.add_argument(
        "--vocab-file", default=None, help="HF tokenizer JSON, GPT-2 vocab.json, sentencepiece model or .tiktoken file"
    )
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    g.add_argument(
        "--eod-token",
        default=None,
        help="end-of-document token, when the file has none of <|endoftext|>, </s>, ... (e.g. <|im_end|>)",
    )
    g.add_argument("--pad-token", default=None, help="padding token (default <|padding|>, else the EOD token)")


def register(parser: argparse.ArgumentParser, name: str) -> None:
    g = parser.add_argument_group("input")
    g.add_argument(
        "--input",
        required=True,
        action="append",
        help="input files: .jsonl/.txt, optionally .gz/.zst; comma-separated, repeatable, globs "
        "and directories allowed",
    )
    g.add_argument(
        "--json-keys",
        "--jsonl-keys",
        dest="json_keys",
        nargs="+",
        default=["text"],
        help="JSON keys to tokenize; each key becomes its own dataset (default: text)",
    )
    g.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="file",
        help="how .txt files become documents: the whole file (GPT-NeoX), blank-line-separated "
        "paragraphs, or lines (default: file)",
    )
    g.add_argument("--num-docs", type=int, default=None, help="number of documents, for the progress bar")
    add_tokenizer_args(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_{key}_document.bin/.idx")
    g.add_argument("--dataset-impl", choices=["mmap"], default="mmap", help="only GPT-NeoX's mmap format")
    g.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's EOD id")
    g.add_argument("--ftfy", action="store_true", help="fix mojibake and odd unicode with ftfy first")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["uint16", "int32", "int64"],
        help="token dtype (default: uint16 when the vocabulary is below 65500, else int32)",
    )
    g = parser.add_argument_group("fine-tuning labels")
    g.add_argument(
        "--mask-before-token",
        default=None,
        help="comma-separated token ids: also write OUTPUT_PREFIX_label_document where every token "
        "up to and including the first occurrence of this sequence is -100 (GPT-NeoX)",
    )
    g.add_argument(
        "--prompt-key", default=None, help="JSON key of a prompt put before the text; the label dataset is -100 over it"
    )
    g = parser.add_argument_group("chat SFT (GPT-NeoX preprocess_data_with_chat_template.py)")
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|tokenizer",
        help="render JSONL conversations (--json-keys, default messages: a list of {role, content}) with this "
        "Jinja template, or with tokenizer_config.json's chat_template beside --vocab-file ('tokenizer'); writes "
        "OUTPUT_PREFIX_{key}_document and OUTPUT_PREFIX_{key}_label_document (loss on --generation-role turns)",
    )
    g.add_argument("--generation-role", default="assistant", help="the role trained on (default assistant)")
    g.add_argument("--only-last", action="store_true", help="train on the last turn of that role only")
    g.add_argument("--no-mask", action="store_true", help="train on every token of the conversation")
    g = parser.add_argument_group("preference data (train_impl dpo / kto)")
    g.add_argument(
        "--preference",
        choices=["pairs", "unpaired"],
        default=None,
        help="pairs: JSONL of prompt, chosen, rejected -> OUTPUT_PREFIX_{chosen,rejected}_document and their "
        "_label_document (pos_/neg_*_data_paths); unpaired (KTO): prompt, completion, label (true/false) -> "
        "OUTPUT_PREFIX_completion_document, its label dataset and OUTPUT_PREFIX_reward_document; the labels are "
        "-100 over the prompt and every completion ends with EOD",
    )
    g = parser.add_argument_group("runtime")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes (1: in this process, using the tokenizer's own threads)",
    )
    g.add_argument(
        "--batch-bytes", type=int, default=1 << 18, help="input bytes per batch sent to a worker (default 256 KiB)"
    )
    g.add_argument("--log-interval", type=int, default=100, help="update the progress bar every N documents")
    g.add_argument("--strict", action="store_true", help="stop at the first malformed input line")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    parser.set_defaults(func=run)


def parse_token_ids(spec: str | None) -> list | None:
    if spec is None:
        return None
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--mask-before-token: {spec!r} is not a comma-separated list of token ids") from None
    if not ids:
        raise ConfigError("--mask-before-token: give at least one token id")
    return ids


def _refuse_plain_flags(args, mode: str) -> None:
    """Conversations and preference records are read in this process, one line at a time, each a whole document
    that always ends with EOD; the flags of plain corpora would do nothing there."""
    if args.workers != 1 or args.ftfy or args.text_mode != "file":
        raise ConfigError(
            f"{mode} reads JSONL in one process without text cleaning; drop --workers, --ftfy, --text-mode"
        )


def run_chat(args) -> int:
    _refuse_plain_flags(args, "--chat-template")
    if args.mask_before_token or args.prompt_key:
        raise ConfigError("--chat-template makes its own labels; drop --mask-before-token / --prompt-key")
    keys = ["messages"] if args.json_keys == ["text"] else args.json_keys
    if len(keys) != 1:
        raise ConfigError("--json-keys: --chat-template reads exactly one key (the list of messages)")
    opts = ChatOptions(
        inputs=args.input,
        output_prefix=args.output_prefix,
        template=args.chat_template,
        key=keys[0],
        generation_role=args.generation_role,
        only_last_turn=args.only_last,
        no_mask=args.no_mask,
        dtype=args.dtype,
    )
    summary = preprocess_chat(opts, args)
    if not args.quiet:
        print(f"neox preprocess: {summary.line()}")
    return 0


def run_preference(args) -> int:
    _refuse_plain_flags(args, "--preference")
    if args.mask_before_token or args.prompt_key or args.chat_template:
        raise ConfigError(
            "--preference makes its own labels; drop --mask-before-token / --prompt-key / --chat-template"
        )
    opts = PreferenceOptions(args.input, args.output_prefix, kind=args.preference, dtype=args.dtype)
    summary = preprocess_preferences(opts, args)
    if not args.quiet:
        print(
            f"neox preprocess: {summary.documents:,} records, {summary.tokens:,} tokens; wrote "
            + ", ".join(f"{p}.{{bin,idx}}" for p in summary.outputs.values())
        )
    return 0


def run(args) -> int:
    if args.preference is not None:
        return run_preference(args)
    if args.chat_template is not None:
        return run_chat(args)
    opts = PreprocessOptions(
        inputs=args.input,
        output_prefix=args.output_prefix,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        ftfy=args.ftfy,
        workers=args.workers,
        strict=args.strict,
        text_mode=args.text_mode,
        mask_before_token=parse_token_ids(args.mask_before_token),
        prompt_key=args.prompt_key,
        dtype=args.dtype,
        batch_bytes=args.batch_bytes,
        log_interval=args.log_interval,
        num_docs=args.num_docs,
        progress=False if args.quiet else None,
    )
    summary = preprocess(opts, args)
    if not args.quiet:
        print(f"neox preprocess: {summary.line()}")
    return 0
