"""What a new user trips on (issue 10), each reproduced with the user's own command: `neox train
configs/tiny-cpu.yml` with `--set` overrides on a dataset they just preprocessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neox.cli import main
from neox.data.indexed import IndexedDataset
from neox.errors import DataError
from neox.train import checkpoint as ckpt
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
