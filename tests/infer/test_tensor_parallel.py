"""`neox generate` / `neox eval --nproc 2`: the model tensor parallel over two gloo processes gives the one-process
greedy tokens and log-likelihoods, from checkpoints saved by one process, under tp2 and under ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox.cli import main
from neox.infer.api import load
from tests.conftest import ROOT
from tests.infer.tiny import make_run, random_model, tiny_config
from tests.parallel.dist_helpers import torchrun

HERE = Path(__file__).resolve().parent
PROMPTS = ["hello ", "the quick brown fox", "a"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu"]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: {kind}
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
{extra}metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
DOCS = ["the quick brown fox jumps over the lazy dog", "seven wizards quietly hex every king", "a small green valley"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    cfg = tiny_config(generation={"stop_strings": []})
    # weights large enough that the greedy choices are far from ties
    make_run(d / "run", cfg, random_model(cfg, scale=0.5))
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    for name, kind, metric, extra in (
        ("tiny_ll", "loglikelihood", "acc", ""),
        ("tiny_gen", "generate_until", "exact_match", 'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 4\n'),
    ):
        text = TASK.format(name=name, data=tasks / "docs.jsonl", kind=kind, metric=metric, extra=extra)
        (tasks / f"{name}.yaml").write_text(text)
    return d


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_process(run_dir: Path, prompts: Path, out: Path) -> list[dict]:
    argv = ["generate", str(run_dir), "--input-file", str(prompts), "--output-file", str(out)]
    assert main([*argv, *GREEDY]) == 0
    return _rows(out)


def _same_tokens(ours: list[dict], reference: list[dict]) -> None:
    assert [r["prompt"] for r in ours] == PROMPTS
    assert [r["token_ids"] for r in ours] == [r["token_ids"] for r in reference]
    assert [r["completion"] for r in ours] == [r["completion"] for r in reference]
    assert all(len(r["token_ids"]) == 8 for r in ours)  # no EOD in these: every step was compared


@pytest.mark.slow
def test_generate_nproc2_matches_one_process(files, tmp_path):
    out = tmp_path / "tp.jsonl"
    argv = ["generate", str(files / "run"), "--nproc", "2", "--input-file", str(files / "prompts.txt")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "neox.cli", *argv, "--output-file", str(out), *GREEDY],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("wrote 3 completions") == 1  # rank 0 alone writes and reports
    _same_tokens(_rows(out), _one_process(files / "run", files / "prompts.txt", tmp_path / "one.jsonl"))


def _samples(results_dir: Path) -> dict:
    samples = json.loads((results_dir / "results.json").read_text())["samples"]
    return {task: sorted((s["doc_id"], s["resps"]) for s in rows) for task, rows in samples.items()}


@pytest.mark.slow
def test_tp2_zero3_checkpoints_sampling_and_eval(files, tmp_path):
    out = tmp_path / "out"
    torchrun(
        str(HERE / "tp_worker.py"), 2, str(out), str(files / "run"), str(files / "prompts.txt"), str(files / "tasks")
    )
    worker = json.loads((out / "worker.json").read_text())
    # tiny model: 4 heads, head_dim 16; each rank caches its 2
    assert worker["cache_shape"] == [1, 2, 8, 16]
    assert worker["sampled"][0] == worker["sampled"][1] and len(worker["sampled"][0][0]) == 6
    assert "not supported under tensor parallelism" in worker["compile_error"]

    # the checkpoints hold the weights scaled from the original, whatever layout saved them
    original, _ = load(files / "run")
    for name, factor in (("tp2", 1.5), ("zero3", 0.75)):
        saved, _ = load(out / name)
        for (key, a), b in zip(original.module.state_dict().items(), saved.module.state_dict().values()):
            torch.testing.assert_close(b, a * factor, msg=f"{name}: {key}")
        _same_tokens(
            _rows(out / f"gen_{name}.jsonl"),
            _one_process(out / name, files / "prompts.txt", tmp_path / f"{name}.jsonl"),
        )

    eval_argv = ["eval", str(files / "run"), "--tasks", "tiny_ll,tiny_gen", "--include-path", str(files / "tasks")]
    assert main([*eval_argv, "--log-samples", "--output", str(tmp_path / "eval1"), "--device", "cpu"]) == 0
    ours, reference = _samples(out / "eval"), _samples(tmp_path / "eval1")
    assert ours.keys() == reference.keys() == {"tiny_ll", "tiny_gen"}
    assert [d for d, _ in ours["tiny_ll"]] == [0, 1, 2]
    # resps: per request, per repeat, [log-likelihood, is_greedy]
    ll = lambda rows: [(r[0][0], r[0][1]) for _, resps in rows for r in resps]  # noqa: E731
    assert len(ll(ours["tiny_ll"])) == len(DOCS)
    for (a, greedy_a), (b, greedy_b) in zip(ll(ours["tiny_ll"]), ll(reference["tiny_ll"])):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    assert ours["tiny_gen"] == reference["tiny_gen"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "parallel.pipe_parallel_size=2"], "pipeline stages are not supported at inference"),
        (["--set", "parallel.model_parallel_size=4"], "parallel.model_parallel_size=4 but 2 process(es) run"),
        (["--interactive"], "--interactive reads one terminal"),
        (["--compile", "--prompt", "a"], "--compile (generation.compile_decode) is not supported with --nproc > 1"),
    ],
)
def test_layouts_inference_refuses(files, capsys, extra, message):
    # refused in the launcher, before torchrun starts anything
    assert main(["generate", str(files / "run"), "--nproc", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_nproc_must_divide_the_heads(files, capsys):
    assert main(["generate", str(files / "run"), "--nproc", "3", "--prompt", "a"]) == 2
    assert "num_attention_heads=4 is not divisible by model_parallel_size=3" in capsys.readouterr().err
    assert main(["eval", str(files / "run"), "--tasks", "tiny_ll", "--nproc", "3"]) == 2
    assert "not divisible by model_parallel_size=3" in capsys.readouterr().err
