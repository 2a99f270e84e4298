"""`neox config show CONFIG... [--set KEY=VALUE]` and `neox config docs`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from neox.commands.common import add_config_args
from neox.config import docs
from neox.config.loader import resolve, to_dict


def register(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the merged, validated config as YAML")
    add_config_args(show)
    show.add_argument("--training", action="store_true", help="also apply the checks a training run needs")
    docs_parser = sub.add_parser("docs", help="regenerate docs/config.md from the schema")
    docs_parser.add_argument("--check", action="store_true", help="only report whether docs/config.md is up to date")
    docs_parser.add_argument("--out", default=None, help="write here instead of docs/config.md")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        # every no-effect key with its reason, here only: other commands print one short line per file
        r = resolve(args.configs, args.overrides, args.config_dir, training=args.training, announce=False)
        for note in r.notes:
            print(f"note: {note}", file=sys.stderr)
        sys.stdout.write(yaml.safe_dump(to_dict(r.config), sort_keys=False))
        return 0
    path = Path(args.out) if args.out else docs.DOC_PATH
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != docs.render():
            print(f"{path} is out of date; run `neox config docs`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    print(f"wrote {docs.write(path)}")
    return 0
