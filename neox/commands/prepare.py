"""`neox prepare NAME`: download (or build) a named corpus as JSONL, and optionally tokenize it.

Flags follow GPT-NeoX's prepare_data.py (-t, -v, -m, -d, -f, -n). Without -t the corpus is only written as
``DIR/NAME.jsonl`` (DIR = --out, else DATA_DIR/NAME); with -t it is also tokenized, with EOD appended, into
``DIR/NAME_text_document.{bin,idx}``.

Eval sets (lambada, piqa, wikitext2) go to the eval data folder the bundled local lm-eval tasks read: --out,
else $NEOX_EVAL_DATA, else ~/.cache/neox/eval-data (`neox eval --data-dir` reads another one).
"""

from __future__ import annotations

import argparse
import os
import sys

from neox.config.schema import TokenizerConfig
from neox.data import corpora
from neox.data.download import MIRROR_ENV
from neox.data.eval_sets import EVAL_DATA_ENV, EVAL_SETS, eval_data_dir
from neox.data.preprocess import PreprocessOptions, preprocess
from neox.errors import NeoxError


def register(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "name", nargs="?", help=f"corpus or eval set to prepare ({', '.join(corpora.names())}; --list says more)"
    )
    parser.add_argument("--list", action="store_true", help="list the known corpora and eval sets and exit")
    parser.add_argument(
        "-d",
        "--data-dir",
        default=None,
        help="parent directory; a corpus goes to DATA_DIR/NAME (default: $DATA_DIR or ./data)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write the corpus to exactly this directory instead; for an eval set, the eval data folder "
        f"(default: ${EVAL_DATA_ENV} or ~/.cache/neox/eval-data)",
    )
    parser.add_argument(
        "-t",
        "--tokenizer-type",
        default=None,
        help="also tokenize with this tokenizer type (see `neox preprocess --help`)",
    )
    parser.add_argument("-v", "--vocab-file", default=None, help="tokenizer file for -t")
    parser.add_argument("-m", "--merge-file", default=None, help="GPT-2 merges.txt for -t GPT2BPETokenizer")
    parser.add_argument("-n", "--num-workers", type=int, default=1, help="tokenizer processes for -t")
    parser.add_argument(
        "-f", "--force-redownload", action="store_true", help="download and convert again even if the files are there"
    )
    parser.add_argument("--url", default=None, help="fetch the corpus file from this URL (same checksum)")
    parser.add_argument(
        "--sha256",
        default=None,
        metavar="HEX",
        help="expected sha256 of the (one) file instead of neox's pinned one: another version of it, or a "
        "corpus neox pins none for (whose first download is otherwise trusted and recorded in DIR/SHA256SUMS)",
    )
    parser.add_argument(
        "--mirror",
        default=None,
        help=f"base URL serving the corpus files by their original names (or set {MIRROR_ENV})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.list:
        for name in corpora.names():
            print(f"{name:18s} {corpora.description(name)}")
        return 0
    if not args.name:
        raise NeoxError(f"name a corpus to prepare: {', '.join(corpora.names())}")
    if args.name == "stdlib" and (args.url or args.mirror or args.sha256):
        raise NeoxError("stdlib is built from local files; --url/--mirror/--sha256 do not apply")
    if args.name in EVAL_SETS:
        if args.data_dir or args.tokenizer_type:
            flag = "-d/--data-dir" if args.data_dir else "-t/--tokenizer-type"
            raise NeoxError(
                f"{flag}: {args.name} is an eval set; it goes to the eval data folder "
                f"(--out DIR, else ${EVAL_DATA_ENV} or ~/.cache/neox/eval-data)"
            )
        out_dir = eval_data_dir(args.out)
    else:
        out_dir = args.out or os.path.join(args.data_dir or os.environ.get("DATA_DIR", "./data"), args.name)
    jsonl = corpora.prepare(
        args.name,
        out_dir,
        mirror=args.mirror,
        url=args.url,
        force=args.force_redownload,
        progress=False if args.quiet else None,
        sha256=args.sha256,
    )
    print(f"wrote {jsonl}")
    if args.name in EVAL_SETS and out_dir != eval_data_dir():
        print(f"neox eval reads it with --data-dir {out_dir} (or {EVAL_DATA_ENV}={out_dir})", file=sys.stderr)
    if args.tokenizer_type:
        corpus = corpora.CORPORA.get(args.name)
        opts = PreprocessOptions(
            inputs=[jsonl],
            output_prefix=os.path.join(out_dir, args.name),
            append_eod=True,
            workers=args.num_workers,
            num_docs=corpus.num_docs if corpus else None,
            progress=False if args.quiet else None,
        )
        tok = TokenizerConfig(
            tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file
        )
        print(preprocess(opts, tok).line())
    return 0
