"""deepy.py: GPT-NeoX's `deepy.py SCRIPT -d CONFIG_DIR a.yml b.yml ...` command lines, run as GPT-NeoX users
type them (train.py, generate.py with text_generation.yml, eval.py with eval_tasks), and their refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import neox.commands.eval as eval_command
from tests.infer.tiny import make_run, tiny_config

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("deepy", ROOT / "deepy.py")
deepy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deepy)

# configs/text_generation.yml exactly as GPT-NeoX ships it
TEXT_GENERATION_YML = """\
# Parameters used for text generation
# Make sure `load` is specified somewhere else
{
  # Text gen type: `input-file`, `unconditional` or `interactive`
  "text_gen_type": "unconditional",

  # Params for all
  "maximum_tokens": 102,
  "prompt_end": "\\n",
  "temperature": 1.0,
  "top_p": 0.0,
  "top_k": 0,
  "recompute": false,

  # `unconditional`: samples
  "num_samples": 10,

  # input/output file
  "sample_input_file": "sample_input.txt",
  "sample_output_file": "sample_output.txt",
}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A run directory with one checkpoint, and a GPT-NeoX config folder whose model config loads it."""
    d = tmp_path_factory.mktemp("deepy")
    make_run(d / "run", tiny_config())
    configs = d / "configs"
    configs.mkdir()
    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 128}
    (configs / "tiny.yml").write_text(json.dumps({**model, "load": str(d / "run"), "save": str(d / "run")}))
    (configs / "noload.yml").write_text(json.dumps(model))
    (configs / "text_generation.yml").write_text(TEXT_GENERATION_YML)
    (configs / "evals.yml").write_text('{"eval_tasks": ["lambada_openai", "piqa"], "eval_tasks_limit": 5}\n')
    return d


def _deepy(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["deepy.py", *argv])
    code = deepy.main()
    return code, *capsys.readouterr()


def test_translate_train_configs_and_launcher_flags():
    assert deepy.translate(["train.py", "-d", "configs", "125M.yml", "local.yml", "--num_gpus", "4"]) == [
        "train",
        "configs/125M.yml",
        "configs/local.yml",
        "--nproc",
        "4",
    ]
    # GPT-NeoX appends .yml to a bare name; its deepy options that set config keys become --set
    assert deepy.translate(["./train.py", "/abs/125M", "--num_nodes=2", "-H", "h", "--wandb_group", "g"]) == [
        "train",
        "/abs/125M.yml",
        "--hostfile",
        "h",
        "--set",
        'wandb_group="g"',
        "--nnodes=2",
    ]


def test_generate_reads_load_and_text_generation_yml(work, monkeypatch, capsys, caplog):
    monkeypatch.chdir(work)  # text_generation.yml writes sample_output.txt relative to where it runs
    argv = ["generate.py", "-d", "configs", "tiny.yml", "text_generation.yml"]
    cfgs = ["configs/tiny.yml", "configs/text_generation.yml"]
    assert deepy.translate(argv) == ["generate", str(work / "run"), "--config", cfgs[0], "--config", cfgs[1]]
    code, _, err = _deepy(monkeypatch, capsys, *argv)
    assert code == 0, err
    records = [json.loads(line) for line in (work / "sample_output.txt").read_text().split("\n") if line]
    # num_samples: 10 unconditional samples of at most maximum_tokens: 102 tokens (unseeded: a sample whose first
    # draw is the end-of-document token is empty, which CI saw once)
    assert len(records) == 10 and all(r["prompt"] == "" and 0 <= r["tokens"] <= 102 for r in records)
    assert max(r["tokens"] for r in records) > 10  # a random model rarely ends a sample early
    # the inert prompt_end key is noted once, not by deepy.py and again by neox generate
    notes = [r for r in caplog.records if r.name == "neox.config.loader" and "text_generation.yml" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in notes]


def test_generate_input_file_from_deepy_flags(work, monkeypatch, capsys):
    (work / "prompts.txt").write_text("Hello\nThe cat\n")
    (work / "configs/input.yml").write_text("text_gen_type: input-file\nmaximum_tokens: 4\ntemperature: 0\n")
    out_file = work / "out.jsonl"
    code, _, err = _deepy(
        monkeypatch, capsys, "generate.py", "-d", str(work / "configs"), "tiny.yml", "text_generation.yml",
        "input.yml", "-i", str(work / "prompts.txt"), "-o", str(out_file), "--iteration", "1",
    )  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in out_file.read_text().split("\n") if line]
    assert [r["prompt"] for r in records] == ["Hello", "The cat"] and all(r["tokens"] <= 4 for r in records)


def test_eval_runs_the_configs_eval_tasks(work, monkeypatch, capsys):
    cfgs = ["-d", str(work / "configs"), "tiny.yml", "evals.yml"]
    run = str(work / "run")
    assert deepy.translate(["eval.py", *cfgs]) == ["eval", run, "--tasks", "lambada_openai,piqa", "--limit", "5"]
    # --eval_tasks on the command line wins, as in GPT-NeoX; --iteration picks one checkpoint
    assert deepy.translate(["eval.py", *cfgs, "--eval_tasks", "hellaswag", "arc_easy", "--iteration", "1"])[:4] == [
        "eval",
        f"{run}/iter_0000001",
        "--tasks",
        "hellaswag,arc_easy",
    ]
    assert deepy.translate(["eval.py", *cfgs, "--eval_results_prefix", "res"])[-2:] == ["--output", "res"]
    # end to end into `neox eval`, with the harness itself replaced: the configs' tasks and limit reach it
    seen = {}

    def fake_run_tasks(lm, tasks, limit=None, **kw):
        seen.update(tasks=tasks, limit=limit)
        return {}

    monkeypatch.setattr(eval_command, "run_tasks", fake_run_tasks)
    monkeypatch.setattr(eval_command, "results_table", lambda results: "table")
    code, out, err = _deepy(monkeypatch, capsys, "eval.py", *cfgs, "--device", "cpu")
    assert code == 0, err
    assert seen == {"tasks": ["lambada_openai", "piqa"], "limit": 5} and "table" in out


@pytest.mark.parametrize(
    "argv,named",
    [
        ("generate.py -d {c} noload.yml text_generation.yml", "no `load` in"),
        ("eval.py -d {c} tiny.yml", "no eval_tasks in"),
        ("eval.py -d {c} tiny.yml evals.yml --iteration x", "--iteration x"),
        ("generate.py -d {c} tiny.yml --num_gpus 2", "--num_gpus"),
        ("eval.py -d {c} tiny.yml evals.yml -i prompts.txt", "-i: eval.py has no use for it"),
        ("generate.py -d {c} nope.yml", "nope.yml"),
        ("generate.py -d {c}", "no config files"),
        ("pretrain_gpt2.py a.yml", "usage: deepy.py"),
    ],
)
def test_refusals_are_one_line(work, monkeypatch, capsys, argv, named):
    code, out, err = _deepy(monkeypatch, capsys, *argv.format(c=work / "configs").split())
    lines = err.strip().splitlines()
    assert out == "" and code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("deepy.py") and ": error: " in lines[0] and named in lines[0], lines[0]


def test_runs_the_neox_command(tmp_path):
    # as a script, end to end through the neox CLI: a missing config is a one-line error from `neox train`
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deepy.py"), "train.py", "-d", str(tmp_path), "nope.yml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "nope.yml" in proc.stderr and proc.stderr.startswith("neox train: error:")
