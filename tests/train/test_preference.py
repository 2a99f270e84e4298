"""Preference objectives: DPO / IPO / conservative DPO and KTO losses against hand-computed values, sequence
log-probabilities against a plain loop, and DPO training through the Trainer raising the reward margin."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from neox.cli import main as cli
from neox.config.schema import TokenizerConfig
from neox.data.preference import PreferenceOptions, preprocess_preferences
from neox.train.preference import REFERENCE_FILE, dpo_loss, kto_loss, reward_scores, rm_loss, sequence_logps
from neox.train.trainer import Trainer
from tests.train.tiny_run import WORDS, tiny_config


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_sigmoid_ipo_and_label_smoothing_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))
    # h = (pc - rc) - (pr - rr) = 0.5 + 0.5 = 1
    loss, good, bad = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(_sig(0.5)), abs=1e-6)
    assert (good.item(), bad.item()) == pytest.approx((0.25, -0.25))
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(-0.9 * math.log(_sig(0.5)) - 0.1 * math.log(_sig(-0.5)), abs=1e-6)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, kind="ipo")  # (h - 1 / (2 beta))^2 = (1 - 2)^2
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # the mean over pairs
    two = dpo_loss(torch.tensor([-1.0, 0.0]), torch.tensor([-2.0, 0.0]), torch.zeros(2), torch.zeros(2), beta=1.0)
    assert two[0].item() == pytest.approx((-math.log(_sig(1.0)) - math.log(_sig(0.0))) / 2, abs=1e-6)


def test_kto_by_hand():
    # rewards r = logp - ref = [1, -0.5, 0.5]; z0 = mean(r) = 1/3 (above 0, kept)
    logps, ref = torch.tensor([-1.0, -2.5, -1.5]), torch.tensor([-2.0, -2.0, -2.0])
    desirable = torch.tensor([True, False, True])
    loss, rewards, z0 = kto_loss(logps, ref, desirable, beta=2.0, desirable_weight=1.0, undesirable_weight=3.0)
    z = 1 / 3
    want = ((1 - _sig(2 * (1 - z))) + 3 * (1 - _sig(2 * (z + 0.5))) + (1 - _sig(2 * (0.5 - z)))) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert z0.item() == pytest.approx(z) and rewards.tolist() == pytest.approx([2.0, -1.0, 1.0])
    # a negative batch mean is clamped to 0
    _, _, z0 = kto_loss(torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([True]), beta=1.0)
    assert z0.item() == 0.0


def test_sequence_logps_equal_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, :2] = -100
    mask = (labels >= 0).float()
    mask[2, 4] = 0.0
    want = []
    for b in range(3):
        total = 0.0
        for t in range(5):
            if labels[b, t] >= 0 and mask[b, t] > 0:
                row = logits[b, t]
                total += (row[labels[b, t]] - torch.logsumexp(row, 0)).item()
        want.append(total)
    assert sequence_logps(logits, labels, mask).tolist() == pytest.approx(want, abs=1e-5)


def _pairs(directory, n, seed):
    """Prompts of random words; the chosen answer repeats the prompt's first word, the rejected one another."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(3)]
        other = rng.choice([w for w in WORDS if w != words[0]])
        rows.append({"prompt": " ".join(words) + ":", "chosen": f" {words[0]}.", "rejected": f" {other}."})
    src = directory / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    s = preprocess_preferences(
        PreferenceOptions([str(src)], str(directory / "pairs")), TokenizerConfig(tokenizer_type="ByteLevelTokenizer")
    )
    return s.outputs


def _dpo_config(outputs, run_dir, **train):
    data = {
        "data_path": None,
        "pos_train_data_paths": [outputs["chosen"]],
        "neg_train_data_paths": [outputs["rejected"]],
        "pos_train_label_data_paths": [outputs["chosen_label"]],
        "neg_train_label_data_paths": [outputs["rejected_label"]],
    }
    return tiny_config(
        "unused",
        run_dir,
        data=data,
        train={"train_impl": "dpo", "dpo_beta": 0.5, "train_iters": 30, "train_micro_batch_size_per_gpu": 4, **train},
        eval={"eval_iters": 0},
        logging={"log_interval": 5, "progress_bar": False},
        checkpoint={"save": str(run_dir), "save_interval": 15},
    )


def test_dpo_training_raises_the_reward_margin(tmp_path):
    torch.set_num_threads(1)
    outputs = _pairs(tmp_path, 32, seed=1)
    run = tmp_path / "run"
    t = Trainer(_dpo_config(outputs, run), quiet=True)
    ref = t.objective.reference["train"].clone()
    t.fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]
    assert len(margins) == 6 and margins[-1] > margins[0] + 0.5, margins
    assert t.losses[-1] < t.losses[0] < 0.75  # from about log 2
    # independently: the trained weights' margins on the training pairs, against the reference table
    ds = t.train_data
    b = ds.batch_documents(range(len(ds)), t.tokenizer.eod_id)
    with torch.no_grad():
        lp = sequence_logps(t.model(b["tokens"]), b["labels"], b["loss_mask"])
    n = len(ds)
    margin = 0.5 * ((lp[:n] - ref[:, 0]) - (lp[n:] - ref[:, 1]))
    assert margin.mean().item() > 0.5 and (margin > 0).float().mean().item() > 0.8
    assert (run / REFERENCE_FILE).is_file()


def test_dpo_resume_scores_against_the_first_runs_reference(tmp_path):
    torch.set_num_threads(1)
    outputs = _pairs(tmp_path, 16, seed=2)
    run = tmp_path / "run"
    cfg = _dpo_config(outputs, run, train_iters=20)
    first = Trainer(cfg, quiet=True)
    first.fit(stop_at=15)
    cfg.checkpoint.load = str(run)
    second = Trainer(cfg, quiet=True)
    assert second.resumed
    assert torch.equal(second.objective.reference["train"], first.objective.reference["train"])
    (run / REFERENCE_FILE).unlink()
    with pytest.raises(Exception, match="resuming needs the reference"):
        Trainer(cfg, quiet=True)


def test_reference_free_dpo_needs_no_reference(tmp_path):
    outputs = _pairs(tmp_path, 8, seed=3)
    t = Trainer(_dpo_config(outputs, tmp_path / "run", dpo_reference_free=True, train_iters=2), quiet=True)
    assert t.objective.reference == {}
    t.fit()
    assert len(t.losses) == 2


def test_kto_training_separates_desirable_from_undesirable(tmp_path):
    torch.set_num_threads(1)
    rng = random.Random(4)
    rows = []
    for _ in range(32):
        words = [rng.choice(WORDS) for _ in range(3)]
        other = rng.choice([w for w in WORDS if w != words[0]])
        good = rng.random() < 0.5
        rows.append({"prompt": " ".join(words) + ":", "completion": f" {words[0] if good else other}.", "label": good})
    src = tmp_path / "kto.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = preprocess_preferences(
        PreferenceOptions([str(src)], str(tmp_path / "kto"), "unpaired"),
        TokenizerConfig(tokenizer_type="ByteLevelTokenizer"),
    ).outputs
    run = tmp_path / "run"
    cfg = tiny_config(
        "unused",
        run,
        data={
            "data_path": None,
            "train_data_paths": [out["completion"]],
            "label_data_paths": [out["completion_label"]],
            "train_reward_data_paths": [out["reward"]],
        },
        train={"train_impl": "kto", "kto_beta": 0.5, "train_iters": 30, "train_micro_batch_size_per_gpu": 8},
        eval={"eval_iters": 0},
    )
    t = Trainer(cfg, quiet=True)
    t.fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]
    assert margins[-1] > margins[0] + 0.3, margins
    assert t.losses[-1] < t.losses[0]


def test_reward_scores_read_the_last_target_position():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    labels = torch.tensor([[-100, 5, 2, -100], [-100, -100, -100, 1]])
    # row 0: last target at t=2 -> logits[0, 2, token]; row 1: t=3
    assert reward_scores(logits, labels, 1).tolist() == [logits[0, 2, 1].item(), logits[1, 3, 1].item()]
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert rm_loss(c, r).item() == pytest.approx((-math.log(_sig(1.0)) - math.log(_sig(-1.0))) / 2, abs=1e-6)


def _rm_rows(n, seed):
    """Synthetic preferences: the chosen answer is made of 'liked' words, the rejected one of the others."""
    rng = random.Random(seed)
    liked, disliked = sorted(set(WORDS))[::2], sorted(set(WORDS))[1::2]
    return [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(3)) + ":",
            "chosen": " " + " ".join(rng.choice(liked) for _ in range(2)),
            "rejected": " " + " ".join(rng.choice(disliked) for _ in range(2)),
        }
        for _ in range(n)
    ]


def test_reward_model_ranks_held_out_pairs_and_neox_score_rates_them(tmp_path, capsys):
    torch.set_num_threads(1)
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rm_rows(64, seed=5)), encoding="utf-8")
    out = preprocess_preferences(
        PreferenceOptions([str(src)], str(tmp_path / "rm")), TokenizerConfig(tokenizer_type="ByteLevelTokenizer")
    ).outputs
    run = tmp_path / "run"
    cfg = _dpo_config(out, run, train_impl="rm", train_iters=40, train_micro_batch_size_per_gpu=8)
    cfg.checkpoint.save_interval = 40
    t = Trainer(cfg, quiet=True)
    assert t.objective.reference == {}  # a reward model needs no reference
    t.fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["pair_accuracy"] for r in records if "pair_accuracy" in r][-1] > 0.8
    held_out = tmp_path / "held_out.jsonl"
    rows = _rm_rows(40, seed=99)
    held_out.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "a", "completion": " b"}) + "\n"
    )
    capsys.readouterr()
    assert cli(["score", str(run), "--input", str(held_out)]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(scored) == 41 and "score" in scored[-1]
    accuracy = sum(s["chosen_score"] > s["rejected_score"] for s in scored[:40]) / 40
    assert accuracy >= 0.8, accuracy  # chance is 0.5
    # neox score's numbers are the trained model's: the training batch of pair 0 gives the same scores
    b = t.train_data.batch_documents([0], t.tokenizer.eod_id)
    with torch.no_grad():
        here = reward_scores(t.model(b["tokens"]), b["labels"], t.tokenizer.eod_id).tolist()
    capsys.readouterr()
    src.write_text(src.read_text().splitlines()[0] + "\n")
    assert cli(["score", str(run), "--input", str(src)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [got["chosen_score"], got["rejected_score"]] == pytest.approx(here, abs=1e-4)
