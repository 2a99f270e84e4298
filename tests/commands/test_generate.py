"""`neox generate`: the Makefile's flags, input-file -> JSONL, interactive streaming, errors."""

import io
import json
import re

import pytest
import torch

from neox.cli import main
from neox.commands import generate as commands
from neox.infer.api import load
from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from tests.infer.tiny import greedy_reference, make_run, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = tiny_config(generation={"maximum_tokens": 12, "stop_strings": []})
    return make_run(tmp_path_factory.mktemp("gen") / "run", cfg)


def test_makefile_flags(run_dir, capsys):
    argv = [
        "generate",
        str(run_dir),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "16",
        "--num-samples",
        "2",
        "--temperature",
        "0.8",
        "--top-p",
        "0.95",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("\ndef ") == 2
    texts = lambda o: [line for line in o.splitlines() if not line.startswith("--- sample")]  # noqa: E731
    assert main(argv) == 0 and texts(capsys.readouterr().out) == texts(out)  # seeded: the same samples again
    model, tok = load(run_dir)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    ids = [tok.encode("def ")] * 2
    res = generate(model.module, ids, 16, params, eod_id=tok.eod_id, generator=torch.Generator().manual_seed(3))
    assert texts(out) == ["def " + tok.decode(t) for t in res.tokens]  # the flags reach generate() as given


def test_input_file_to_jsonl_with_timing(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('first prompt\n{"prompt": "second\\nprompt"}\n\nthird\n')
    out = tmp_path / "out" / "samples.jsonl"
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--input-file",
                str(prompts),
                "--output-file",
                str(out),
                "--temperature",
                "0",
                "--batch-size",
                "2",
                "--set",
                "generation.maximum_tokens=5",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["first prompt", "second\nprompt", "third"]
    assert all(r["tokens"] <= 5 and r["time_s"] > 0 and r["finish_reason"] in ("length", "eod") for r in rows)
    assert {"completion", "tokens_per_s", "batch_size"} <= rows[0].keys()
    model, tok = load(run_dir)
    greedy = [greedy_reference(model.module, tok.encode(r["prompt"]), 5, eod_id=tok.eod_id) for r in rows]
    assert [r["completion"] for r in rows] == [tok.decode(t) for t in greedy]
    assert [r["tokens"] for r in rows] == [len(t) for t in greedy]


def test_recompute_gives_the_same_greedy_text(run_dir, capsys):
    base = ["generate", str(run_dir), "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "8"]
    main(base)
    cached = capsys.readouterr().out.split("\n", 1)[1]
    main(base + ["--recompute"])
    assert capsys.readouterr().out.split("\n", 1)[1] == cached


@pytest.mark.slow  # compiles the decode step
def test_compiled_decoding_gives_the_same_greedy_text(run_dir, capsys):
    base = ["generate", str(run_dir), "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "8"]
    main(base)
    eager = capsys.readouterr().out.split("\n", 1)[1]
    assert main(base + ["--compile"]) == 0
    out, err = capsys.readouterr()
    assert out.split("\n", 1)[1] == eager
    # compile time is reported beside the throughput, not inside it; the compiler itself prints nothing
    assert re.match(r"--- sample 0 \(\d+ tokens, \w+, [\d.]+ tok/s, compiled in [\d.]+ s\) ---", out)
    assert "AUTOTUNE" not in out + err and "Warning" not in err
    assert main(base + ["--compile", "--recompute"]) == 2
    assert "compile and recompute cannot be combined" in capsys.readouterr().err


def test_interactive_streams_each_prompt(run_dir):
    model, tok = load(run_dir)
    ns = type("A", (), {"seed": 0, "no_stop_at_eod": True})()
    gen = model.cfg.generation
    session = commands.Session(model, tok, gen, ns)
    out = io.StringIO()
    records = session.interactive(stdin=io.StringIO("hello\nworld\n"), stdout=out)
    assert [r["prompt"] for r in records] == ["hello", "world"]
    # streamed pieces add up to each completion, one line per prompt
    assert out.getvalue() == records[0]["completion"] + "\n" + records[1]["completion"] + "\n"
    assert all(r["tokens"] == 12 for r in records)  # the checkpoint's generation.maximum_tokens
    # sampled at the checkpoint's temperature from one generator seeded once: generate() on the same ids
    g, draws = torch.Generator().manual_seed(0), []
    params = SamplingParams(gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty)
    for prompt in ("hello", "world"):
        draws.append(tok.decode(generate(model.module, [tok.encode(prompt)], 12, params, generator=g).tokens[0]))
    assert [r["completion"] for r in records] == draws


def test_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert main(["generate", str(run_dir), "--input-file", str(bad)]) == 2
    assert f"{bad}:1: JSON line needs a string 'prompt'" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--top-p", "2"]) == 2
    assert "generation.top_p=2.0" in capsys.readouterr().err
