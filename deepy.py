#!/usr/bin/env python
"""GPT-NeoX's launcher entry, kept so that GPT-NeoX command lines run as they are:

    python deepy.py train.py -d configs 125M.yml local_setup.yml
        -> neox train configs/125M.yml configs/local_setup.yml
    python deepy.py generate.py -d configs 125M.yml text_generation.yml
        -> neox generate LOAD --config configs/125M.yml --config configs/text_generation.yml
    python deepy.py eval.py -d configs 125M.yml --eval_tasks lambada_openai piqa
        -> neox eval LOAD --tasks lambada_openai,piqa

All config files are merged in order, as GPT-NeoX does (a name without .yml/.json gets .yml). generate.py and
eval.py take the model from the configs' `load` (its latest checkpoint, or iter_N with --iteration N);
generate.py's settings come from the text_generation.yml keys (text_gen_type, maximum_tokens,
sample_input_file, sample_output_file, temperature, top_p, top_k, ...); eval.py runs the configs' `eval_tasks`
unless --eval_tasks names others (eval_include_path and eval_tasks_limit are honoured too).

deepy.py's own options, as GPT-NeoX spells them: -d/--conf_dir, --eval_tasks T..., --iteration N,
--eval_results_prefix P (eval.py: `neox eval --output P`), -i/--sample_input_file, -o/--sample_output_file,
--wandb_project/--wandb_group/--wandb_run_name/--wandb_team, -H/--hostfile (train.py). Config-key options become
`--set KEY=VALUE`. The DeepSpeed launcher flags --num_gpus / --num_nodes become train's --nproc / --nnodes;
any other argument is passed on to the neox command unchanged (e.g. --device cpu).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout without installing neox

from neox.cli import main as neox_main
from neox.config.loader import resolve
from neox.errors import NeoxError
from neox.train.checkpoint import checkpoint_name

SCRIPTS = {"train.py": "train", "generate.py": "generate", "eval.py": "eval", "evaluate.py": "eval"}
RENAMED = {"--num_gpus": "--nproc", "--num-gpus": "--nproc", "--num_nodes": "--nnodes", "--num-nodes": "--nnodes"}
# GPT-NeoX deepy.py options (NeoXArgs.consume_deepy_args): flag -> (name, takes several values)
OPTIONS = {
    "-d": ("conf_dir", False),
    "--conf_dir": ("conf_dir", False),
    "--conf-dir": ("conf_dir", False),
    "--eval_tasks": ("eval_tasks", True),
    "--iteration": ("iteration", False),
    "--eval_results_prefix": ("eval_results_prefix", False),
    "-i": ("sample_input_file", False),
    "--sample_input_file": ("sample_input_file", False),
    "-o": ("sample_output_file", False),
    "--sample_output_file": ("sample_output_file", False),
    "--wandb_project": ("wandb_project", False),
    "--wandb_group": ("wandb_group", False),
    "--wandb_run_name": ("wandb_run_name", False),
    "--wandb_team": ("wandb_team", False),
    "-H": ("hostfile", False),
    "--hostfile": ("hostfile", False),
}
# the options each neox command has a use for (the rest are refused, naming the flag)
USES = {
    "train": {"conf_dir", "hostfile", "eval_tasks", "iteration", "eval_results_prefix", "sample_input_file",
              "sample_output_file", "wandb_project", "wandb_group", "wandb_run_name", "wandb_team"},
    "generate": {"conf_dir", "iteration", "sample_input_file", "sample_output_file"},
    "eval": {"conf_dir", "iteration", "eval_tasks", "eval_results_prefix"},
}  # fmt: skip


def _split(script: str, command: str, rest: list[str]) -> tuple[list[str], dict, list[str]]:
    """Arguments after the script -> (config files, deepy options, arguments for the neox command)."""
    configs, opts, passthrough = [], {}, []
    i = 0
    while i < len(rest):
        a = rest[i]
        name, eq, value = a.partition("=")
        if name in OPTIONS:
            key, many = OPTIONS[name]
            j = i + 1
            while not eq and j < len(rest) and not rest[j].startswith("-") and (many or j == i + 1):
                j += 1
            values = [value] if eq else rest[i + 1 : j]
            if not values or not all(values):
                raise NeoxError(f"{name} needs a value")
            if key not in USES[command]:
                raise NeoxError(f"{name}: {script} has no use for it (neox {command}); drop the flag")
            opts[key], i = (values if many else values[0]), j
            continue
        if name in RENAMED:
            if command != "train":
                raise NeoxError(f"{name}: neox {command} runs in one process; drop it (pick one with --device)")
            passthrough.append(RENAMED[name] + (eq + value if eq else ""))
        elif not passthrough and not a.startswith("-"):
            configs.append(a if a.endswith((".yml", ".yaml", ".json")) else a + ".yml")
        else:
            passthrough.append(a)
        i += 1
    if not configs:
        raise NeoxError(f"no config files; give them as GPT-NeoX does: deepy.py {script} -d configs a.yml b.yml")
    if "conf_dir" in opts:
        configs = [c if os.path.isabs(c) else os.path.join(opts["conf_dir"], c) for c in configs]
    return configs, opts, passthrough


@contextlib.contextmanager
def _quiet_config_notes():
    # `neox generate` reads the same files again and prints their "no effect" notes itself: print them once
    logger = logging.getLogger("neox.config.loader")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _checkpoint(configs: list[str], opts: dict, script: str):
    """The merged config and the checkpoint GPT-NeoX's generate.py / eval.py would load: `load` (or
    load/iter_N for --iteration N)."""
    cfg = resolve(configs).config
    load = cfg.checkpoint.load
    if not load:
        raise NeoxError(
            f"no `load` in {', '.join(configs)}; {script} reads the model from it: add `load: CHECKPOINT_DIR` to "
            "a config (the run's save directory)"
        )
    if "iteration" in opts:
        try:
            load = os.path.join(load, checkpoint_name(int(opts["iteration"])))
        except ValueError:
            raise NeoxError(f"--iteration {opts['iteration']}: not an iteration number") from None
    return cfg, load


def _sets(opts: dict, keys: tuple) -> list[str]:
    # JSON is YAML: a path stays a string, an --eval_tasks list a list
    return [a for k in keys if k in opts for a in ("--set", f"{k}={json.dumps(opts[k])}")]


def _train(configs, opts, passthrough) -> list[str]:
    hostfile = ["--hostfile", opts["hostfile"]] if "hostfile" in opts else []
    keys = tuple(sorted(USES["train"] - {"conf_dir", "hostfile"}))
    return ["train", *configs, *hostfile, *_sets(opts, keys), *passthrough]


def _generate(configs, opts, passthrough, script) -> list[str]:
    with _quiet_config_notes():
        _, load = _checkpoint(configs, opts, script)
    extra = [a for c in configs for a in ("--config", c)]
    return ["generate", load, *extra, *_sets(opts, ("sample_input_file", "sample_output_file")), *passthrough]


def _eval(configs, opts, passthrough, script) -> list[str]:
    cfg, load = _checkpoint(configs, opts, script)
    tasks = opts.get("eval_tasks") or cfg.eval.eval_tasks
    if not tasks:
        raise NeoxError(
            f"no eval_tasks in {', '.join(configs)}; add `eval_tasks: [lambada_openai]` to a config or pass "
            "--eval_tasks lambada_openai"
        )
    argv = ["eval", load, "--tasks", ",".join(map(str, tasks))]
    if cfg.eval.eval_include_path:
        argv += ["--include-path", cfg.eval.eval_include_path]
    if cfg.eval.eval_tasks_limit:
        argv += ["--limit", str(cfg.eval.eval_tasks_limit)]
    if "eval_results_prefix" in opts:
        argv += ["--output", opts["eval_results_prefix"]]
    return argv + passthrough


def translate(argv: list[str]) -> list[str]:
    """deepy.py arguments -> `neox` arguments (NeoxError for a command line that cannot be run)."""
    script = os.path.basename(argv[0]) if argv else ""
    if script not in SCRIPTS:
        got = argv[0] if argv else "nothing"
        raise NeoxError(f"usage: deepy.py {{{','.join(SCRIPTS)}}} [-d CONF_DIR] CONFIG.yml ... (got {got})")
    command = SCRIPTS[script]
    configs, opts, passthrough = _split(script, command, argv[1:])
    if command == "train":
        return _train(configs, opts, passthrough)
    if command == "generate":
        return _generate(configs, opts, passthrough, script)
    return _eval(configs, opts, passthrough, script)


def main() -> int:
    script = os.path.basename(sys.argv[1]) if len(sys.argv) > 1 else ""
    try:
        argv = translate(sys.argv[1:])
    except NeoxError as e:
        print(f"deepy.py{' ' + script if script in SCRIPTS else ''}: error: {e}", file=sys.stderr)
        return 2
    # `neox train --nproc N` re-launches itself from sys.argv: make that the translated command line
    sys.argv = ["neox", *argv]
    return neox_main(argv)


if __name__ == "__main__":
    sys.exit(main())
