"""Numerical guards (neox.train.guards): NaN in a batch or a gradient, loss spikes, and what each policy does.

NaN reaches a step from the test's side only: a forward hook on the input embedding corrupts the batch that
starts at a given sample (so a rollback that skips that batch never meets it again), or a wrapper around the
runner writes NaN into one gradient after the backward pass on a given iteration.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from neox.config import from_dict
from neox.errors import ConfigError
from neox.train import checkpoint as ckpt
from neox.train.guards import NONFINITE, SPIKE, Guards, GuardStop
from neox.train.trainer import Trainer

from ..parallel.dist_helpers import torchrun
from ..syncs import count_syncs
from .test_syncs import traced
from .tiny_run import make_corpus, tiny_config

GB = 2  # global batch of tiny_config (micro 2, no accumulation, one process)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=100)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def config(corpus, run=None, train=None, **groups):
    base = {"eval": {"eval_iters": 0}, "logging": {"log_interval": 1}}
    base.update(groups)
    return tiny_config(corpus, run, train={"train_iters": 8, **(train or {})}, **base)


def nan_batch(trainer: Trainer, first_sample: int) -> None:
    """NaN embeddings for the training batch that starts at global sample `first_sample`."""

    def hook(module, args, out):
        if module.training and trainer.consumed_samples == first_sample:
            return out * float("nan")
        return out

    trainer.model.embed_in.register_forward_hook(hook)


def nan_grad(trainer: Trainer, iterations) -> None:
    """A NaN in one gradient of the steps that complete `iterations` (after the backward pass)."""
    forward_backward = trainer.runner.forward_backward

    def wrapped(micro_batches, loss_scale=1.0):
        loss = forward_backward(micro_batches, loss_scale)
        if trainer.iteration + 1 in iterations:
            trainer.model.embed_in.weight.grad.view(-1)[3] = float("nan")
        return loss

    trainer.runner.forward_backward = wrapped


def state_of(trainer: Trainer) -> dict:
    """Copies of every parameter and every optimizer state tensor."""
    out = {f"p.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    for i, p in enumerate(trainer.model.parameters()):
        for k, v in trainer.optimizer.state.get(p, {}).items():
            out[f"s.{i}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def around_step(trainer: Trainer, iteration: int) -> dict:
    """State before and after the step that completes `iteration` (filled during fit)."""
    seen, step = {}, trainer.train_step

    def wrapped(micro_batches):
        before = trainer.iteration + 1 == iteration
        if before:
            seen["before"] = state_of(trainer)
        out = step(micro_batches)
        if before:
            seen["after"] = state_of(trainer)
        return out

    trainer.train_step = wrapped
    return seen


def events(run, kind=None) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" in r and (kind is None or r["event"] == kind)]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


# ---------------------------------------------------------------- skip
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])  # fused: decided on the device; foreach: on the host
def test_skip_leaves_weights_and_optimizer_state(corpus, tmp_path, optimizer):
    opt = {"type": optimizer, "momentum": 0.9} if optimizer == "sgd" else {"type": optimizer}
    clean = Trainer(config(corpus, optimizer=opt), quiet=True)
    clean.fit()
    trainer = Trainer(config(corpus, tmp_path, optimizer=opt, logging={"log_interval": 4}), quiet=True)
    nan_grad(trainer, {3})
    seen = around_step(trainer, 3)
    summary = trainer.fit()
    assert_same(seen["before"], seen["after"])  # weights, moments / momentum and step counts untouched
    assert trainer.losses[:3] == clean.losses[:3]  # up to the bad step's forward pass: the same run
    assert all(math.isfinite(x) for x in trainer.losses) and trainer.iteration == 8
    assert summary["guard_skipped_steps"] == 1 and trainer.guards.counts["nonfinite"] == 1
    assert summary["skipped_steps"] == 0  # fp16's overflow count is not touched
    (event,) = events(tmp_path, "nonfinite")
    assert event["iteration"] == 3 and event["policy"] == "skip" and event["values"]["grad_norm"] == "nan"
    assert event["samples"] == [2 * GB, 2 * GB + 1]
    logs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["guard_skipped"] for r in logs if "event" not in r] == [1, 0]
    # the log line's mean leaves the skipped step out
    assert logs[0]["loss"] == pytest.approx(statistics.mean(trainer.losses[i] for i in (0, 1, 3)))


def test_skip_a_nan_batch_names_its_documents(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path), quiet=True)
    nan_batch(trainer, 4 * GB)
    seen = around_step(trainer, 5)
    trainer.fit()
    assert_same(seen["before"], seen["after"])
    (event,) = events(tmp_path, "nonfinite")
    assert event["iteration"] == 5 and event["values"] == {"loss": "nan", "grad_norm": "nan"}
    samples = list(range(4 * GB, 5 * GB))
    assert event["samples"] == samples
    assert event["documents"] == [trainer.train_data.document_ids(i).tolist() for i in samples]
    assert math.isnan(trainer.losses[4]) and all(math.isfinite(x) for i, x in enumerate(trainer.losses) if i != 4)


def test_fp16_overflow_and_nan_loss_are_counted_apart(corpus, tmp_path):
    """fp16: a non-finite norm is the loss scaler's overflow (as before); a NaN loss is the guards' and leaves
    the scaler as it was."""
    fp16 = {"precision": "fp16", "initial_scale_power": 60}  # every other step overflows
    trainer = Trainer(config(corpus, tmp_path, precision=fp16), quiet=True)
    nan_batch(trainer, 5 * GB)
    scaler, seen = trainer.precision.scaler, {}
    step = trainer.train_step

    def wrapped(micro_batches):
        if trainer.iteration + 1 == 6:
            seen["before"] = (scaler.state_dict(), trainer.skipped_steps, state_of(trainer))
        out = step(micro_batches)
        if trainer.iteration + 1 == 6:
            seen["after"] = (scaler.state_dict(), trainer.skipped_steps + out[2], state_of(trainer))
        return out

    trainer.train_step = wrapped
    summary = trainer.fit()
    assert seen["before"][:2] == seen["after"][:2]
    assert_same(seen["before"][2], seen["after"][2])
    assert summary["skipped_steps"] == 7  # the scaler's overflows, not the guards'
    assert summary["guard_skipped_steps"] == 1 and [e["iteration"] for e in events(tmp_path)] == [6]


# ---------------------------------------------------------------- stop
def test_stop_is_one_line_and_saves_nothing_after(corpus, tmp_path):
    cfg = config(
        corpus,
        tmp_path,
        train={"nonfinite_policy": "stop"},
        logging={"log_interval": 3},
        checkpoint={"save": str(tmp_path), "save_interval": 2},
    )
    trainer = Trainer(cfg, quiet=True)
    nan_batch(trainer, 3 * GB)  # step 4; the save due at 4 reads the verdicts first
    with pytest.raises(GuardStop) as err:
        trainer.fit()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("step 4: non-finite loss nan") and "iter_0000002" in msg
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000002"]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    weights = ckpt.load_full_model_state(tmp_path / "iter_0000002")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [e["iteration"] for e in events(tmp_path, "nonfinite")] == [4]


# ---------------------------------------------------------------- rollback
def test_rollback_reloads_the_checkpoint_and_skips_past_the_bad_batches(corpus, tmp_path):
    cfg = config(
        corpus,
        tmp_path,
        train={"nonfinite_policy": "rollback"},
        logging={"log_interval": 3},
        checkpoint={"save": str(tmp_path), "save_interval": 4},
    )
    trainer = Trainer(cfg, quiet=True)
    nan_batch(trainer, 4 * GB)  # step 5, read at the log line of step 6
    after, roll_back = {}, trainer._roll_back

    def wrapped(*args, **kwargs):
        roll_back(*args, **kwargs)
        after["weights"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        after["position"] = (trainer.iteration, trainer.consumed_samples)

    trainer._roll_back = wrapped
    summary = trainer.fit()
    saved = ckpt.load_full_model_state(tmp_path / "iter_0000004")
    assert after["weights"].keys() == saved.keys()
    for name, w in after["weights"].items():
        assert torch.equal(w, saved[name]), name
    # on from the sample after the bad batch (step 5's): step 6's batch, trained on the discarded state, comes again
    assert after["position"] == (4, 5 * GB)
    assert summary["rollbacks"] == 1 and trainer.iteration == 8 and trainer.consumed_samples == 9 * GB
    (bad,) = events(tmp_path, "nonfinite")
    assert bad["iteration"] == 5 and bad["policy"] == "rollback" and bad["samples"] == [4 * GB, 4 * GB + 1]
    (rollback,) = events(tmp_path, "rollback")
    assert rollback["from_iteration"] == 6 and rollback["iteration"] == 4
    assert rollback["skipped_samples"] == [4 * GB, 5 * GB]
    assert len(trainer.losses) == 8 and all(math.isfinite(x) for x in trainer.losses)


def test_rollbacks_are_limited(corpus, tmp_path):
    cfg = config(
        corpus,
        tmp_path,
        train={"nonfinite_policy": "rollback", "max_rollbacks": 1},
        checkpoint={"save": str(tmp_path), "save_interval": 2},
    )
    trainer = Trainer(cfg, quiet=True)
    nan_grad(trainer, {3})  # by iteration: it comes back after the rollback
    with pytest.raises(GuardStop, match=r"^step 3: .* after 1 rollback\(s\) \(train.max_rollbacks: 1\)") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter_0000002"]
    assert len(events(tmp_path, "rollback")) == 1 and len(events(tmp_path, "nonfinite")) == 2


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_an_interrupted_run_does_not_save_over_an_unhandled_event(corpus, tmp_path, policy):
    """Ctrl-C saves on the way out, unless a rollback or stop is still owed for a step before it."""
    cfg = config(
        corpus,
        tmp_path,
        train={"nonfinite_policy": policy},
        logging={"log_interval": 10},
        checkpoint={"save": str(tmp_path), "save_interval": 100},
    )
    trainer = Trainer(cfg, quiet=True)
    nan_batch(trainer, 2 * GB)  # step 3
    step = trainer.train_step

    def interrupted(micro_batches):
        if trainer.iteration + 1 == 5:
            raise KeyboardInterrupt
        return step(micro_batches)

    trainer.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert saved == (["iter_0000004"] if policy == "skip" else [])


def test_rollback_needs_a_save_directory(corpus):
    d = {"data": {"data_path": corpus}, "train": {"loss_spike_policy": "rollback"}}
    with pytest.raises(ConfigError, match="train.loss_spike_policy': rollback reloads a checkpoint"):
        from_dict(d, training=True)
    with pytest.raises(ConfigError, match="loss_spike_window': must be 0 .off. or at least 2"):
        from_dict({"train": {"loss_spike_window": 1}})


# ---------------------------------------------------------------- loss spikes
def test_spike_zscore_against_a_hand_computed_series():
    cfg = from_dict({"train": {"loss_spike_window": 4, "loss_spike_zscore": 3.0}}).train
    guards = Guards(cfg, torch.device("cpu"))
    series = [2.0, 1.9, 1.95, 1.85, 1.8, 2.6, 1.78, float("nan"), 1.75, 1.7]
    accepted, got = [], []
    norm = torch.tensor(1.0)
    for x in series:
        code, z, _, _ = guards.verdict(torch.tensor(x), norm).tolist()
        got.append((int(code), z))
        if len(accepted) >= 4 and math.isfinite(x):
            window = accepted[-4:]
            want = (x - statistics.mean(window)) / statistics.stdev(window)
            assert z == pytest.approx(want, rel=1e-5), x
        if code == 0:
            accepted.append(x)
    # 2.6 is (2.6 - 1.875) / 0.0645 = 11.2 deviations above the four before it; the NaN is non-finite
    assert [c for c, _ in got] == [0, 0, 0, 0, 0, SPIKE, 0, NONFINITE, 0, 0]
    assert got[5][1] == pytest.approx(0.725 / math.sqrt(0.0125 / 3), rel=1e-5)  # mean 1.875, squares sum 0.0125
    assert accepted == [2.0, 1.9, 1.95, 1.85, 1.8, 1.78, 1.75, 1.7]  # neither entered the window


def test_spike_in_training_is_logged_and_skipped(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train={"loss_spike_window": 3, "loss_spike_zscore": 4.0})
    trainer = Trainer(cfg, quiet=True)
    forward_backward = trainer.runner.forward_backward

    def spiking(micro_batches, loss_scale=1.0):
        loss = forward_backward(micro_batches, loss_scale)
        return loss * 5 if trainer.iteration + 1 == 6 else loss  # the judged loss jumps, the gradients do not

    trainer.runner.forward_backward = spiking
    seen = around_step(trainer, 6)
    summary = trainer.fit()
    assert_same(seen["before"], seen["after"])
    (event,) = events(tmp_path, "loss_spike")
    window = trainer.losses[2:5]
    assert event["iteration"] == 6 and event["policy"] == "skip"
    want = (trainer.losses[5] - statistics.mean(window)) / statistics.stdev(window)
    assert event["values"]["zscore"] == pytest.approx(want, rel=1e-4)
    assert summary["guard_skipped_steps"] == 1 and trainer.guards.counts["loss_spike"] == 1


def test_spike_state_survives_a_resume(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train={"loss_spike_window": 3}, checkpoint={"save": str(tmp_path)})
    first = Trainer(cfg, quiet=True)
    first.fit(stop_at=5)
    history = first.guards.history.clone()
    cfg = config(
        corpus, tmp_path, train={"loss_spike_window": 3}, checkpoint={"save": str(tmp_path), "load": str(tmp_path)}
    )
    resumed = Trainer(cfg, quiet=True)
    assert torch.equal(resumed.guards.history, history) and float(resumed.guards.filled) == 3
    assert resumed.guards.history.tolist() == pytest.approx(first.losses[2:5], rel=1e-6)


# ---------------------------------------------------------------- host syncs
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_guarded_steps_read_nothing_on_the_host(corpus, device):
    """The verdict and the skipped update stay on the device (fused AdamW): a step that does not log reads
    nothing, and a log line still reads its window once, verdicts included."""
    cfg = config(
        corpus, train={"train_iters": 6, "loss_spike_window": 2, "device": device}, logging={"log_interval": 3}
    )
    trainer = Trainer(cfg, quiet=True)
    nan_grad(trainer, {2})
    seen = around_step(trainer, 2)
    steps, logs = traced(trainer)
    with count_syncs() as everything:
        summary = trainer.fit()
    assert steps == [[]] * 6
    assert [len(x) for x in logs] == [1, 1] and len(everything) == 2, everything
    assert summary["guard_skipped_steps"] == 1
    assert_same(seen["before"], seen["after"])


# ---------------------------------------------------------------- two processes
@pytest.mark.slow
def test_ranks_decide_alike_when_one_rank_goes_bad(corpus, tmp_path):
    """A NaN in one rank's gradient after the reduction (the other's are finite): every rank skips that update
    (dp2: the weights stay identical on both ranks), and dp2, pp2 and tp2 follow the one-process run that
    skipped it."""
    # a vocabulary that two tensor-parallel shards split without padding it further
    groups = {
        "model": {"vocab_size": 384},
        "train": {"train_iters": 5, "train_batch_size": 4},
        "eval": {"eval_iters": 0},
    }
    one = Trainer(tiny_config(corpus, **groups), quiet=True)
    nan_grad(one, {3})
    one.fit()
    runs = [
        {"name": "dp2", "groups": groups, "rank": 1, "iteration": 3},
        {"name": "pp2", "groups": {**groups, "parallel": {"pipe_parallel_size": 2}}, "rank": 0, "iteration": 3},
        # DTensor parameters: foreach AdamW, so the verdict is read on the host
        {"name": "tp2", "groups": {**groups, "parallel": {"model_parallel_size": 2}}, "rank": 1, "iteration": 3},
    ]
    (tmp_path / "spec.json").write_text(json.dumps({"data": corpus, "runs": runs}))
    torchrun("../train/guards_worker.py", 2, str(tmp_path / "spec.json"), str(tmp_path / "out"))
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1)]
    for name in ("dp2", "pp2", "tp2"):
        for got in ranks:
            assert got[name]["counts"] == {"nonfinite": 1, "loss_spike": 0, "rollbacks": 0}, name
            assert got[name]["guard_skipped_steps"] == 1
        assert ranks[0][name]["losses"] == pytest.approx(one.losses, abs=1e-5), name
    assert ranks[0]["dp2"]["checksum"] == ranks[1]["dp2"]["checksum"]
