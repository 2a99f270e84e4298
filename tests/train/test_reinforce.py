"""Online REINFORCE: the estimator against a hand computation, and a toy reward ("say lowercase letters") whose
mean rises over 50 steps of sampling from the policy."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from neox.cli import main as cli
from neox.config.schema import TokenizerConfig
from neox.data.preference import PreferenceOptions, preprocess_preferences
from neox.data.preprocess import PreprocessOptions, preprocess
from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from neox.train.reinforce import REFERENCE_MODEL_FILE, reinforce_loss
from neox.train.trainer import Trainer
from tests.train.tiny_run import WORDS, tiny_config

EOD = 256


def test_reinforce_loss_by_hand():
    logps = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -2.0])
    rewards = torch.tensor([1.0, 0.0, 2.0])
    loss, kl = reinforce_loss(logps, ref, rewards, kl_beta=0.5, leave_one_out=False)
    # kl = [0.5, 0, -1]; shaped = [0.75, 0, 2.5]; baseline = 3.25 / 3; advantage = shaped - baseline
    shaped = [0.75, 0.0, 2.5]
    adv = [s - sum(shaped) / 3 for s in shaped]
    assert kl.tolist() == pytest.approx([0.5, 0.0, -1.0])
    assert loss.item() == pytest.approx(-sum(a * lp for a, lp in zip(adv, [-1.0, -2.0, -3.0])) / 3, abs=1e-6)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-a / 3 for a in adv], abs=1e-6)  # the advantage has no gradient
    loss, _ = reinforce_loss(logps.detach(), ref, rewards, kl_beta=0.5, leave_one_out=True)
    loo = [s - (sum(shaped) - s) / 2 for s in shaped]
    assert loss.item() == pytest.approx(-sum(a * lp for a, lp in zip(loo, [-1.0, -2.0, -3.0])) / 3, abs=1e-6)


def sampler(model, prompts, max_new_tokens, temperature):
    out = generate(model, prompts, max_new_tokens, SamplingParams(temperature=temperature), eod_id=EOD)
    return [y + [EOD] if why == "eod" else y for y, why in zip(out.tokens, out.finish_reasons)]


def letters(prompts, completions):
    """The toy reward: the fraction of the completion's tokens that are lowercase ASCII letters."""
    return [sum(97 <= t <= 122 for t in y) / max(1, len(y)) for y in completions]


def _prompts(directory):
    rng = random.Random(0)
    src = directory / "prompts.jsonl"
    src.write_text("".join(json.dumps({"text": f"{rng.choice(WORDS)} {i}:"}) + "\n" for i in range(40)))
    prefix = str(directory / "prompts")
    preprocess(
        PreprocessOptions(inputs=[str(src)], output_prefix=prefix, progress=False),
        TokenizerConfig(tokenizer_type="ByteLevelTokenizer"),
    )
    return prefix + "_text_document"


def test_mean_reward_rises_over_50_steps(tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = tiny_config(
        "unused",
        run,
        data={"data_path": None, "train_data_paths": [_prompts(tmp_path)]},
        train={
            "train_impl": "reinforce",
            "train_iters": 50,
            "train_micro_batch_size_per_gpu": 8,
            "reinforce_max_new_tokens": 6,
            "reinforce_samples_per_prompt": 2,
            "reinforce_leave_one_out": True,
            "kl_div_beta": 0.01,
        },
        optimizer={"type": "adamw", "lr": 1e-2, "weight_decay": 0.0},
        schedule={"lr_decay_style": "constant", "warmup_iters": 0},
        eval={"eval_iters": 0},
        logging={"log_interval": 10, "progress_bar": False},
        checkpoint={"save": str(run), "save_interval": 50},
    )
    t = Trainer(cfg, quiet=True, sampler=sampler, reward_fn=letters)
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["mean_reward"] for r in records if "mean_reward" in r]
    assert len(rewards) == 5 and rewards[-1] > rewards[0] + 0.2, rewards
    assert all(torch.equal(start[k], v) for k, v in t.objective.reference_model.state_dict().items())
    assert (run / REFERENCE_MODEL_FILE).is_file()
    kl = [r["kl_to_reference"] for r in records if "kl_to_reference" in r]
    assert kl[-1] > 0  # the policy moved away from its reference


def test_reinforce_without_sampling_functions_is_one_line(tmp_path):
    cfg = tiny_config("unused", None, data={"data_path": None, "train_data_paths": [_prompts(tmp_path)]})
    cfg.train.train_impl = "reinforce"
    with pytest.raises(Exception, match="needs sampler= and reward_fn="):
        Trainer(cfg, quiet=True)


def test_neox_train_samples_and_scores_with_a_reward_model_checkpoint(tmp_path, capsys):
    """The command's own sampler and reward (a train_impl: rm run), two steps."""
    torch.set_num_threads(1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"{i}:", "chosen": " abc", "rejected": " 123"}) + "\n" for i in range(8))
    )
    out = preprocess_preferences(
        PreferenceOptions([str(pairs)], str(tmp_path / "pairs")), TokenizerConfig(tokenizer_type="ByteLevelTokenizer")
    ).outputs
    model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 32}
    common = {**model, "make_vocab_size_divisible_by": 64, "tokenizer_type": "ByteLevelTokenizer", "device": "cpu"}
    common.update(train_micro_batch_size_per_gpu=4, log_interval=1, eval_iters=0, progress_bar=False)
    rm = {
        **common,
        "train_impl": "rm",
        "train_iters": 2,
        "save": str(tmp_path / "rm"),
        "pos_train_data_paths": [out["chosen"]],
        "neg_train_data_paths": [out["rejected"]],
        "pos_train_label_data_paths": [out["chosen_label"]],
        "neg_train_label_data_paths": [out["rejected_label"]],
    }
    (tmp_path / "rm.yml").write_text(json.dumps(rm))
    assert cli(["train", str(tmp_path / "rm.yml")]) == 0
    policy = {
        **common,
        "train_impl": "reinforce",
        "train_iters": 2,
        "reinforce_max_new_tokens": 4,
        "reinforce_reward_model": str(tmp_path / "rm"),
        "save": str(tmp_path / "policy"),
        "train_data_paths": [_prompts(tmp_path)],
    }
    (tmp_path / "policy.yml").write_text(json.dumps(policy))
    capsys.readouterr()
    assert cli(["train", str(tmp_path / "policy.yml")]) == 0
    records = [json.loads(line) for line in (tmp_path / "policy/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "mean_reward" in r] == [1, 2]
    assert all(math.isfinite(r["mean_reward"]) for r in records if "mean_reward" in r)
