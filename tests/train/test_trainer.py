"""The training loop: exact resume, metrics.jsonl across resumes, fine-tuning, fp16 overflow skipping."""

import json

import pytest
import torch

from neox.errors import NeoxError
from neox.train import checkpoint as ckpt
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config

NO_EVAL = {"eval_iters": 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: a second thread only adds synchronisation stalls on a shared 2-core machine.
    torch.set_num_threads(1)


def run(cfg, stop_at=None):
    t = Trainer(cfg, quiet=True)
    t.fit(stop_at)
    return t


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("precision,accum", [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)])
def test_resume_is_exact(corpus, tmp_path, precision, accum):
    groups = dict(
        precision={"precision": precision},
        eval=NO_EVAL,
        model={"hidden_dropout": 0.1},
        train={"gradient_accumulation_steps": accum},
    )
    straight = run(tiny_config(corpus, tmp_path / "a", **groups))
    first = run(tiny_config(corpus, tmp_path / "b", **groups), stop_at=10)
    resumed = run(tiny_config(corpus, tmp_path / "b", checkpoint={"load": str(tmp_path / "b")}, **groups))

    assert resumed.iteration == 20 and resumed.consumed_samples == 20 * 2 * accum
    assert first.losses + resumed.losses == straight.losses  # bitwise: == on Python floats
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[-1] < straight.losses[0]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_appends_across_resume_and_has_eval(corpus, tmp_path):
    run(tiny_config(corpus, tmp_path), stop_at=10)
    run(tiny_config(corpus, tmp_path, checkpoint={"load": str(tmp_path)}))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train] == [5, 10, 15, 20]
    for r in train:
        assert {"lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["grad_norm"] > 0
    evals = [(r["iteration"], sorted(r)) for r in records if "loss" not in r]
    # eval every 10 iterations (the first run stops at 10 after its eval); the test split once at the end
    assert evals == [
        (10, ["iteration", "val_loss", "val_ppl"]),
        (20, ["iteration", "val_loss", "val_ppl"]),
        (20, ["iteration", "test_loss", "test_ppl"]),
    ]
    val = [r for r in records if "val_loss" in r]
    assert val[-1]["val_ppl"] == pytest.approx(2.718281828 ** val[-1]["val_loss"], rel=1e-6)


def test_save_interval_keep_last_and_extra_iters(corpus, tmp_path):
    run(
        tiny_config(
            corpus,
            tmp_path,
            eval=NO_EVAL,
            checkpoint={"save_interval": 4, "keep_last_n_checkpoints": 2, "extra_save_iters": [3]},
        )
    )
    # saved at 3, 4, 8, 12, 16, 20; only the last two remain
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000016", "iter_0000020"]
    assert ckpt.saved_config(tmp_path)["train"]["train_batch_size"] == 2  # the resolved batch triple


def test_finetune_loads_weights_only(corpus, tmp_path):
    base = run(tiny_config(corpus, tmp_path / "base", train={"train_iters": 6}, eval=NO_EVAL))
    cfg = tiny_config(
        corpus,
        tmp_path / "ft",
        train={"train_iters": 3},
        eval=NO_EVAL,
        checkpoint={"load": str(tmp_path / "base"), "finetune": True},
    )
    ft = Trainer(cfg, quiet=True)
    assert ft.iteration == 0 and ft.consumed_samples == 0 and not ft.optimizer.state
    a, b = weights(base), weights(ft)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ft.fit()
    assert ft.iteration == 3
    with pytest.raises(NeoxError, match="checkpoint.load: .*none does not exist"):
        Trainer(tiny_config(corpus, None, checkpoint={"load": str(tmp_path / "none"), "finetune": True}), quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeoxError, match="not a checkpoint"):
        Trainer(tiny_config(corpus, None, checkpoint={"load": str(tmp_path / "empty"), "finetune": True}), quiet=True)


def test_fp16_overflow_skips_step_and_lowers_scale(corpus, tmp_path):
    # a 2**22 initial scale overflows fp16 activations' gradients: steps are skipped until the scale fits
    cfg = tiny_config(
        corpus,
        tmp_path,
        train={"train_iters": 8},
        eval=NO_EVAL,
        logging={"log_interval": 8},
        precision={"precision": "fp16", "initial_scale_power": 22, "hysteresis": 1},
    )
    t = Trainer(cfg, quiet=True)
    before = weights(t)
    t.fit()
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert t.skipped_steps >= 1 and record["skipped"] == t.skipped_steps
    assert t.skipped_steps < 8 and t.precision.scaler.scale == 2.0 ** (22 - t.skipped_steps)
    assert any(not torch.equal(before[k], v) for k, v in weights(t).items())  # later steps did update
    # skipped steps (all at the start here) do not advance the schedule: the last update used lr(7 - skipped)
    assert record["lr"] == pytest.approx(t.schedule.lr_at(7 - t.skipped_steps))


def test_async_save_publishes_every_checkpoint(corpus, tmp_path):
    t = run(
        tiny_config(
            corpus,
            tmp_path,
            train={"train_iters": 6},
            eval=NO_EVAL,
            checkpoint={"save_interval": 2, "keep_last_n_checkpoints": 2, "async_save": True},
        )
    )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000004", "iter_0000006"]
    assert ckpt.resolve(tmp_path).name == "iter_0000006" and not list(tmp_path.glob("*.tmp"))
    resumed = Trainer(
        tiny_config(corpus, None, train={"train_iters": 6}, checkpoint={"load": str(tmp_path)}), quiet=True
    )
    a, b = weights(t), weights(resumed)
    assert resumed.iteration == 6 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("interval,expected", [(2, [2, 4]), (3, [3, 4]), (None, [4])])
def test_eval_tasks_run_on_their_interval_and_once_at_the_end(corpus, tmp_path, interval, expected):
    # the evaluator stands in for lm-eval: the trainer calls it on its model and tokenizer and logs the scores
    calls = []

    def evaluate_tasks(model, tokenizer):
        calls.append((t.iteration, model is t.model, tokenizer is t.tokenizer))
        return {"fake/acc": 0.25 * len(calls)}

    cfg = tiny_config(
        corpus,
        tmp_path,
        train={"train_iters": 4},
        eval={"eval_iters": 0, "eval_tasks": ["fake"], "eval_tasks_interval": interval},
    )
    t = Trainer(cfg, quiet=True, evaluate_tasks=evaluate_tasks)
    summary = t.fit()
    assert calls == [(i, True, True) for i in expected]
    logged = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval_tasks/fake/acc" in r]
    assert [(r["iteration"], r["eval_tasks/fake/acc"]) for r in logged] == [
        (i, 0.25 * (n + 1)) for n, i in enumerate(expected)
    ]
    assert summary["eval_tasks/fake/acc"] == 0.25 * len(expected)


def test_eval_tasks_need_an_evaluator(corpus):
    with pytest.raises(NeoxError, match="evaluate_tasks"):
        Trainer(tiny_config(corpus, None, eval={"eval_tasks": ["piqa_local"]}), quiet=True)


def test_a_bad_device_names_the_key(corpus):
    with pytest.raises(NeoxError, match=r"train.device 'bogus': not a device"):
        Trainer(tiny_config(corpus, None, train={"device": "bogus"}), quiet=True)


def test_a_cuda_device_becomes_the_current_one(monkeypatch):
    """train.device: cuda:1 in one process: the CUDA RNG a checkpoint saves is cuda:1's, not GPU 0's."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    Trainer._use_device(torch.device("cuda", 1))
    Trainer._use_device(torch.device("cpu"))
    assert chosen == [torch.device("cuda", 1)]
