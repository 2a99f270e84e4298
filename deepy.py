#!/usr/bin/env python
"""GPT-NeoX's launcher entry, kept so existing scripts keep working:

    python deepy.py train.py -d configs 125M.yml local_setup.yml [--num_gpus 8] [--hostfile hosts]

runs `neox train configs/125M.yml configs/local_setup.yml [--nproc 8] [--hostfile hosts]`. generate.py and
eval.py map to `neox generate` / `neox eval`. DeepSpeed launcher flags --num_gpus / --num_nodes become
--nproc / --nnodes; every other argument is passed on unchanged.
"""

from __future__ import annotations

import os
import sys

SCRIPTS = {"train.py": "train", "generate.py": "generate", "eval.py": "eval", "evaluate.py": "eval"}
RENAMED = {"--num_gpus": "--nproc", "--num-gpus": "--nproc", "--num_nodes": "--nnodes", "--num-nodes": "--nnodes"}


def translate(argv: list[str]) -> list[str]:
    """deepy.py arguments -> `neox` arguments."""
    if not argv or os.path.basename(argv[0]) not in SCRIPTS:
        raise SystemExit(
            f"usage: deepy.py {{{','.join(SCRIPTS)}}} [-d CONF_DIR] CONFIG.yml ... "
            f"(got {argv[0] if argv else 'nothing'})"
        )
    command, rest = SCRIPTS[os.path.basename(argv[0])], argv[1:]
    conf_dir, configs, passthrough = None, [], []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("-d", "--conf_dir", "--conf-dir"):
            if i + 1 == len(rest):
                raise SystemExit(f"deepy.py: {a} needs a directory")
            conf_dir, i = rest[i + 1], i + 2
            continue
        name, eq, value = a.partition("=")
        if name in RENAMED:
            passthrough.append(RENAMED[name] + (eq + value if eq else ""))
        elif a.endswith((".yml", ".yaml")) and not passthrough:
            configs.append(a)
        else:
            passthrough.append(a)
        i += 1
    if conf_dir is not None:
        configs = [c if os.path.isabs(c) else os.path.join(conf_dir, c) for c in configs]
    return [command, *configs, *passthrough]


def main() -> int:
    from neox.cli import main as neox_main

    argv = translate(sys.argv[1:])
    # `neox train --nproc N` re-launches itself from sys.argv: make that the translated command line
    sys.argv = ["neox", *argv]
    return neox_main(argv)


if __name__ == "__main__":
    sys.exit(main())
