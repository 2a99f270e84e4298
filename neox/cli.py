"""`neox <command>`: one entry point; each command's parser lives next to the code it runs.

Command modules are imported only when their command is chosen, so `neox --help` and light commands start
fast (importing torch alone takes seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from neox.errors import NeoxError

# name -> (module providing `register(parser)` for that command, one-line help)
COMMANDS = {
    "prepare": (
        "neox.commands.prepare",
        "download/build a named corpus (enron, tinyshakespeare, stdlib, ...) or eval set (lambada, piqa, ...)",
    ),
    "preprocess": ("neox.commands.preprocess", "tokenize JSONL/text into GPT-NeoX .bin/.idx files"),
    "tokenizer": ("neox.commands.tokenizer", "train a byte-level BPE tokenizer"),
    "data": ("neox.commands.data", "inspect or merge .bin/.idx datasets"),
    "info": ("neox.commands.info", "parameter count, FLOPs per token and memory estimates for a config"),
    "train": ("neox.commands.train", "train or fine-tune a model from YAML configs"),
    "distill": ("neox.commands.distill", "train a student from a teacher checkpoint (train_impl: distill)"),
    "checkpoint": ("neox.commands.checkpoint", "checkpoint tools (consolidate a sharded checkpoint)"),
    "generate": ("neox.commands.generate", "sample text from a checkpoint"),
    "eval": ("neox.commands.eval", "evaluate a checkpoint with lm-evaluation-harness"),
    "score": ("neox.commands.score", "rate JSONL pairs or completions with a reward model (train_impl: rm)"),
    "export": ("neox.commands.hf", "export a checkpoint to Hugging Face transformers"),
    "import": ("neox.commands.hf", "import a Hugging Face model as a neox checkpoint"),
    "config": ("neox.commands.config", "show the resolved config or regenerate docs/config.md"),
    "plot": ("neox.commands.plot", "draw loss, validation loss, learning rate, grad norm and throughput of runs"),
    "bench": (
        "neox.commands.bench",
        "training, generation, preprocessing and start-up beside transformers on this machine (table + JSON)",
    ),
    "mup": ("neox.commands.mup", "muP tools (coord-check: activation scale against width, with and without muP)"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neox", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"neox {__import__('neox').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def _die_with_torchrun() -> None:
    """In a torchrun worker, ask Linux for SIGKILL when torchrun dies. torch elastic starts each worker in a
    session of its own, so a kill -9 of the job's process group (the launcher and torchrun) does not reach the
    workers: orphaned, they would train on into the same run directory as the relaunched job. Called first
    thing, before the seconds of importing torch; a torchrun killed before this point leaves a worker whose
    rendezvous store is gone, which then fails instead of training."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # torchrun died between the two calls: the signal will not come
        os._exit(137)


def main(argv: list[str] | None = None) -> int:
    _die_with_torchrun()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    try:
        # importing a command can fail for the user's reasons too (an optional extra not installed)
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"neox {name}", description=COMMANDS[name][1])
        module.register(parser, name)
        args = parser.parse_args(rest)
        return int(args.func(args) or 0)
    except NeoxError as e:
        print(f"neox {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neox {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`neox info ... | head`): stop quietly, as Unix tools do; stdout is redirected
        # to devnull so that the interpreter's final flush does not raise again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
