"""`neox eval` (our LM adapter on the neox model) against lm-eval's own hf backend on the exported directory."""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from neox.cli import main
from neox.train.trainer import Trainer
from tests.infer.tiny import make_run, random_model, tiny_config

pytest.importorskip("lm_eval")

TASKS = ["lambada_openai_local", "piqa_local", "wikitext2_local", "lambada_gen_local"]


def _metrics(task_results):
    return {k: float(v) for k, v in task_results.items() if "," in k and "stderr" not in k}


@pytest.mark.slow
def test_neox_eval_matches_hf_backend_on_exported_model(tmp_path, shared_data, monkeypatch, capsys):
    import lm_eval

    from neox.interop.eval_tasks import materialize
    from neox.interop.lm_eval import task_manager

    monkeypatch.setenv("NEOX_SHARED_DATA", str(shared_data))
    gpt2 = str(shared_data / "tokenizers" / "gpt2.json")
    cfg = tiny_config(tokenizer={"tokenizer_type": "HFTokenizer", "vocab_file": gpt2}, vocab_size=50304, seq_length=256)
    model = random_model(cfg, scale=0.02)
    make_run(tmp_path / "run", cfg, model)

    assert (
        main(
            [
                "eval",
                str(tmp_path / "run"),
                "--tasks",
                ",".join(TASKS),
                "--limit",
                "4",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    ours = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert "piqa_local" in (tmp_path / "out" / "results.txt").read_text()

    assert main(["export", "hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,max_length=256",
        tasks=TASKS,
        task_manager=task_manager((str(materialize(shared_data)),)),
        limit=4,
        batch_size=8,
        device="cpu",
        bootstrap_iters=0,
    )["results"]
    for task in TASKS:
        a, b = _metrics(ours[task]), _metrics(theirs[task])
        assert a.keys() == b.keys() and a, task
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4), (task, key)

    # the trainer's eval_tasks step (evaluate_model on the in-memory model) logs the same scores
    logged, printed = [], []
    tcfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, eval_tasks=["piqa_local"], eval_tasks_limit=4))
    fake = SimpleNamespace(
        cfg=tcfg, model=model, tokenizer=_tokenizer(cfg), iteration=5, train_iters=10, seq_length=256
    )
    summary = {}
    model.train()  # as the trainer holds it
    Trainer._eval_tasks_and_log(
        fake, SimpleNamespace(log=logged.append), SimpleNamespace(print=printed.append), summary
    )
    assert logged[0]["iteration"] == 5
    assert logged[0]["eval_tasks/piqa_local/acc"] == pytest.approx(ours["piqa_local"]["acc,none"])
    assert "eval_tasks/piqa_local/acc_norm" in summary and "piqa_local/acc" in printed[0]
    assert model.training is True  # given back in the mode it came in

    # unknown names are refused before anything runs (the task index is cached by now)
    assert main(["eval", str(tmp_path / "run"), "--tasks", "no_such_task_xyz", "--limit", "1"]) == 2
    assert "unknown lm-eval task(s) ['no_such_task_xyz']" in capsys.readouterr().err


def _tokenizer(cfg):
    from neox.data.tokenizers import build_tokenizer

    return build_tokenizer(cfg.tokenizer)


def test_results_table_lists_metrics_with_stderr():
    from neox.interop.lm_eval import flat_scores, results_table

    res = {
        "results": {
            "piqa_local": {
                "alias": "piqa_local",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "acc_norm,none": 0.25,
                "acc_norm_stderr,none": "N/A",
            }
        }
    }
    table = results_table(res).splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr"]
    assert table[2].split() == ["piqa_local", "acc", "0.5000", "0.1000"]
    assert table[3].split() == ["piqa_local", "acc_norm", "0.2500"]
    assert flat_scores(res) == {"piqa_local/acc": 0.5, "piqa_local/acc_norm": 0.25}


def test_bf16_loglikelihoods_track_fp32():
    """A pure-bf16 model scores like its fp32 self (on a CPU without bf16 units, through the fp32-block matmul)."""
    import torch

    from neox.interop.lm_eval import NeoxLM

    cfg = tiny_config()
    model = random_model(cfg, scale=0.3)
    tok = _tokenizer(cfg)
    requests = [SimpleNamespace(args=("The cat sat on", " the mat")), SimpleNamespace(args=("One two", " three"))]
    fp32 = NeoxLM(model, tok).loglikelihood(requests)
    bf16 = NeoxLM(random_model(cfg, scale=0.3).to(torch.bfloat16), tok).loglikelihood(requests)
    for (a, _), (b, _) in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=0.05, abs=0.1)
