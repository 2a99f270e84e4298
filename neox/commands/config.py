"""`neox config show CONFIG... [--set KEY=VALUE]` and `neox config docs`."""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the merged, validated config as YAML")
    show.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML/JSON files, merged in order")
    show.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key after the files (repeatable); VALUE is read as YAML",
    )
    show.add_argument("-d", "--config-dir", default=None, help="directory the CONFIG names are relative to")
    show.add_argument("--training", action="store_true", help="also apply the checks a training run needs")
    docs = sub.add_parser("docs", help="regenerate docs/config.md from the schema")
    docs.add_argument("--check", action="store_true", help="only report whether docs/config.md is up to date")
    docs.add_argument("--out", default=None, help="write here instead of docs/config.md")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        import yaml

        from neox.config.loader import resolve, to_dict

        r = resolve(args.configs, args.overrides, args.config_dir, training=args.training)
        for note in r.notes:
            print(f"note: {note}", file=sys.stderr)
        sys.stdout.write(yaml.safe_dump(to_dict(r.config), sort_keys=False))
        return 0
    from pathlib import Path

    from neox.config import docs

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
