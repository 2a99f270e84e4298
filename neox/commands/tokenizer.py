"""`neox tokenizer train`: train a byte-level BPE tokenizer on JSONL/text files (see neox.data.bpe_training)."""

from __future__ import annotations

import argparse
import sys

from neox.data.bpe_training import MIN_VOCAB, train_tokenizer
from neox.data.tokenizers import EOD_TOKEN


def register(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer and write its JSON")
    t.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help=".jsonl/.txt files (optionally .gz/.zst), globs, directories or comma-separated lists",
    )
    t.add_argument("--vocab-size", type=int, required=True, help=f"vocabulary size (at least {MIN_VOCAB})")
    t.add_argument("--out", required=True, help="output tokenizer JSON file")
    t.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys whose text is used")
    t.add_argument("--min-frequency", type=int, default=2, help="merges must occur at least this often")
    t.add_argument(
        "--text-mode",
        choices=("file", "paragraph", "line"),
        default="paragraph",
        help="how .txt files are cut into training texts (default: paragraph)",
    )
    t.set_defaults(func=run)


def run(args) -> int:
    tok, skipped = train_tokenizer(
        args.inputs, args.vocab_size, args.out, args.json_keys, args.min_frequency, args.text_mode
    )
    for b in skipped[:20]:
        print(f"warning: skipped {b}", file=sys.stderr)
    print(
        f"neox tokenizer: wrote {args.out} (vocab {tok.get_vocab_size()}, {EOD_TOKEN}="
        f"{tok.token_to_id(EOD_TOKEN)}, skipped {len(skipped)} lines)"
    )
    return 0
