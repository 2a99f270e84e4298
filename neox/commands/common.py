"""Arguments and checks that several commands share, so that each flag reads and behaves the same everywhere."""

from __future__ import annotations

import argparse

from neox.errors import NeoxError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """CONFIG... [-d DIR] [--set KEY=VALUE]: GPT-NeoX-style YAML configs, as `neox train` reads them."""
    parser.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG",
        help="YAML/JSON config files, merged in order (later files override earlier ones)",
    )
    parser.add_argument(
        "-d",
        "--config-dir",
        default=None,
        help="directory that relative CONFIG paths are read from (like GPT-NeoX's deepy.py -d)",
    )
    add_overrides(parser, "e.g. --set train_iters=50 --set optimizer.lr=1e-3 (repeatable; applied after the files)")


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config key; VALUE is read as YAML, {example}",
    )


def check_positive(**flags) -> None:
    """One-line errors for count flags that must be >= 1 (given as flag name -> value; None = not given)."""
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise NeoxError(f"--{flag.replace('_', '-')} {value}: must be 1 or more")
