"""What a new user trips on (issue 10), each reproduced with the user's own command: `neox train
configs/tiny-cpu.yml` with `--set` overrides on a dataset they just preprocessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import neox
from neox.cli import main
from neox.data.indexed import IndexedDataset
from neox.errors import DataError
from neox.train import checkpoint as ckpt
from neox.train.metrics import duration
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config

TINY_CPU = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yml")
DOCS = ["hello world, this is doc one.", "second document here", "third doc with some words", "the fourth one!"]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def four_docs(tmp_path_factory):
    """A 4-document JSONL, preprocessed byte-level as the README shows: a few dozen tokens."""
    d = tmp_path_factory.mktemp("four_docs")
    (d / "ft.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    assert main(["preprocess", "--input", str(d / "ft.jsonl"), "--output-prefix", str(d / "ft"), "--append-eod"]) == 0
    return str(d / "ft_text_document")


def tiny_cpu(prefix: str, save: Path, *extra: str) -> list[str]:
    """configs/tiny-cpu.yml on `prefix`, narrowed to a 1-layer 32-wide model so the test is quick (the
    sequence length and batch, which decide how many samples the index holds, stay the config's: 256 x 8)."""
    sets = [
        f"data_path={prefix}",
        "split=100,0,0",
        "tokenizer_type=ByteLevelTokenizer",
        "vocab_file=null",
        "num_layers=1",
        "hidden_size=32",
        f"save={save}",
        "progress_bar=false",
        *extra,
    ]
    return ["train", TINY_CPU, *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("iters", [3, 5, 10])
def test_a_short_run_on_a_tiny_set_trains_to_its_last_step_and_saves(four_docs, tmp_path, iters, capsys):
    tokens = int(IndexedDataset(four_docs).sizes.sum())
    # The user's edge: an epoch of fewer than 256 tokens, so the index holds exactly the 8 * iters samples the
    # run reads: E = ceil((256 N + 1) / T) epochs give (E T - 1) // 256 = N samples, and GPT-NeoX's len is N - 1.
    n = 8 * iters
    epochs = -(-(256 * n + 1) // tokens)
    assert tokens < 256 and (epochs * tokens - 1) // 256 == n
    assert main(tiny_cpu(four_docs, tmp_path / "run", f"train_iters={iters}")) == 0
    out = capsys.readouterr().out
    assert f"iter {iters:>6}/{iters} | loss" in out and f"done: iteration {iters}" in out
    assert (tmp_path / "run" / "latest").read_text().strip() == f"iter_{iters:07d}"


class FailingAt:
    """The training split, raising a DataError (a damaged shard, say) from sample `at` on."""

    def __init__(self, dataset, at: int):
        self.dataset, self.at = dataset, at

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i >= self.at:
            raise DataError(f"sample {i}: cannot read it")
        return self.dataset[i]


def test_a_data_error_mid_run_saves_the_steps_taken_first(tmp_path):
    prefix = make_corpus(tmp_path / "data", docs=100)
    cfg = tiny_config(prefix, tmp_path / "run", eval={"eval_iters": 0}, checkpoint={"save_interval": 100})
    trainer = Trainer(cfg, quiet=True)
    trainer.train_data = FailingAt(trainer.train_data, at=3 * trainer.global_batch)
    with pytest.raises(DataError, match="sample 6"):
        trainer.fit()
    assert trainer.iteration == 3
    assert ckpt.resolve(tmp_path / "run").name == "iter_0000003"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("neox train: error: "), err
    return err


def test_a_new_run_into_a_finished_runs_directory_stops_before_training(four_docs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_cpu(four_docs, run, "train_iters=4", "log_interval=2")) == 0
    capsys.readouterr()
    before = (run / "metrics.jsonl").read_text()
    # A second run into the same directory, as the README's `--nproc 2` example after `make train`: refused
    # in the launching process, before torchrun starts any worker.
    for extra in ([], ["--nproc", "2"]):
        assert main(tiny_cpu(four_docs, run, "train_iters=2") + extra) == 2
        err = one_error_line(capsys)
        assert f"checkpoint.save: {run} already holds a run's checkpoints (newest iter_0000004)" in err
        assert f"--set load={run}" in err and "--set save=DIR" in err and "--set overwrite=true" in err
    assert (run / "latest").read_text().strip() == "iter_0000004"
    assert (run / "metrics.jsonl").read_text() == before

    # The two ways on: resume it (here to 6 steps) ...
    assert main(tiny_cpu(four_docs, run, "train_iters=6", "log_interval=2", f"load={run}")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (run / "latest").read_text().strip() == "iter_0000006"
    # ... or replace it on purpose: the old checkpoints and metrics go, the directory holds the new run only.
    assert main(tiny_cpu(four_docs, run, "train_iters=2", "log_interval=2", "overwrite=true")) == 0
    assert "overwrite: removed 2 checkpoint(s)" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["iter_0000002", "latest", "metrics.jsonl"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2]


def test_a_load_directory_that_is_not_there_is_an_error_unless_it_is_the_save_directory(four_docs, tmp_path, capsys):
    typo = tmp_path / "rnu"
    assert main(tiny_cpu(four_docs, tmp_path / "new", "train_iters=1", f"load={typo}")) == 2
    assert f"checkpoint.load: {typo} does not exist" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()
    # load = save, the Makefile's `make train`: the first run starts from scratch, the second finds the
    # finished run and has nothing to do (the first run's checkpoint and metrics stay as they were).
    run = tmp_path / "run"
    make_train = tiny_cpu(four_docs, run, "train_iters=2", f"load={run}")
    assert main(make_train) == 0
    assert "starting from scratch" in capsys.readouterr().out
    before = (run / "metrics.jsonl").read_text()
    assert main(make_train) == 0
    assert "nothing to train: the checkpoint is at iteration 2" in capsys.readouterr().out
    assert (run / "latest").read_text().strip() == "iter_0000002"
    assert (run / "metrics.jsonl").read_text() == before


def test_eval_interval_0_evaluates_only_at_the_end_and_the_log_shows_layout_elapsed_and_eta(
    four_docs, tmp_path, capsys
):
    run = tmp_path / "run"
    # split 50,50,0 gives the four documents a validation half (its index cached apart from the other tests')
    split = ["split=50,50,0", f"data_cache_dir={tmp_path / 'cache'}"]
    assert main(tiny_cpu(four_docs, run, *split, "train_iters=4", "log_interval=2", "eval_interval=0")) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(line for line in out if line.startswith("model: "))
    assert "batch 8 x 1 x dp 1 = 8 sequences of 256 | layout dp 1 x tp 1 x pp 1, ZeRO 0 |" in start
    assert [line.split(" | ")[0] for line in out if "val loss" in line] == ["iter      4/4"]
    steps = [line for line in out if line.startswith("iter ") and " | loss " in line]
    assert len(steps) == 2 and all(" | elapsed " in s and " | eta " in s for s in steps)
    assert steps[-1].endswith("| eta 0:00")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # two of four steps done: the same time again to go
    assert records[0]["eta_s"] == pytest.approx(records[0]["elapsed_s"])
    assert records[1]["eta_s"] == 0 and records[1]["elapsed_s"] >= records[0]["elapsed_s"]


@pytest.mark.parametrize("seconds,text", [(0.4, "0:00"), (59.6, "1:00"), (754, "12:34"), (3725, "1:02:05")])
def test_durations_read_as_clock_times(seconds, text):
    assert duration(seconds) == text
    assert duration(float("nan")) == "?"


def docs_snippet(page: str, marker: str) -> str:
    """The first ```python block after `marker` on a docs page."""
    text = (Path(__file__).resolve().parents[2] / "docs" / page).read_text()
    after = text[text.index(marker) :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


def test_the_parallelism_docs_snippet_loads_a_consolidated_checkpoint(four_docs, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(tiny_cpu(four_docs, run, "train_iters=1")) == 0
    assert main(["checkpoint", "consolidate", str(run), str(tmp_path / "out" / "model.pt")]) == 0
    monkeypatch.chdir(tmp_path / "out")
    scope: dict = {}
    exec(docs_snippet("parallelism.md", "neox checkpoint consolidate"), scope)  # as a user pastes it
    loaded, _ = neox.load(str(run))  # the checkpoint read straight from its DCP shards
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        reference = loaded(tokens)
        vocab = scope["saved"]["config"]["model"]["vocab_size"]
        assert scope["logits"].shape == reference.shape == (1, 3, vocab)
        torch.testing.assert_close(scope["model"](tokens), reference, rtol=0, atol=0)
