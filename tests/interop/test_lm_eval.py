"""`neox eval` (our LM adapter on the neox model) against lm-eval's own hf backend on the exported directory."""

import dataclasses
import itertools
import json
from types import SimpleNamespace

import pytest

from neox.cli import main
from neox.train.trainer import Trainer
from tests.infer.tiny import make_run, random_model, tiny_config

pytest.importorskip("lm_eval")

TASKS = ["lambada_openai_local", "piqa_local", "wikitext2_local", "lambada_gen_local"]


# random_model's weight perturbation that leaves tiny models' predictions confident (entropy ~2 nats of ~6)
PEAKED_SCALE = 0.5


def assert_peaked(model, ids):
    """The model's next-token distributions are far from uniform: a mean entropy under half of log V."""
    import math

    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    assert entropy < 0.5 * math.log(logp.shape[-1]), f"near-uniform logits: entropy {entropy:.2f}"


def _metrics(task_results):
    return {k: float(v) for k, v in task_results.items() if "," in k and "stderr" not in k}


@pytest.mark.slow
def test_neox_eval_matches_hf_backend_on_exported_model(tmp_path, shared_data, monkeypatch, capsys):
    import lm_eval

    from neox.interop.eval_tasks import materialize
    from neox.interop.lm_eval import evaluate_model, task_manager

    monkeypatch.setenv("NEOX_SHARED_DATA", str(shared_data))
    gpt2 = str(shared_data / "tokenizers" / "gpt2.json")
    cfg = tiny_config(tokenizer={"tokenizer_type": "HFTokenizer", "vocab_file": gpt2}, vocab_size=50304, seq_length=256)
    # weights large enough that the next-token distribution is far from uniform (at 0.02 every choice scored
    # about log(1/50304) and any scoring mix-up would have gone unseen)
    model = random_model(cfg, scale=PEAKED_SCALE)
    assert_peaked(model, _tokenizer(cfg).encode("The quick brown fox jumps over the lazy dog."))
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
        cfg=tcfg,
        model=model,
        tokenizer=_tokenizer(cfg),
        iteration=5,
        train_iters=10,
        seq_length=256,
        # the trainer scores through the callable it is given: evaluate_model on this run's eval settings
        evaluate_tasks=lambda m, t: evaluate_model(m, t, ["piqa_local"], limit=4, max_length=256),
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


def reference_loglikelihood(model, ctx: list[int], cont: list[int], max_length: int) -> tuple[float, bool]:
    """By hand: one forward over context + continuation (the harness keeps the last max_length + 1 tokens and
    feeds all but the final one), log_softmax, the continuation tokens' log-probabilities summed; greedy when
    each continuation token is its position's argmax."""
    import torch

    window = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([window[:-1]]))[0].double(), dim=-1)
    n = len(cont)
    rows = logp[len(window) - 1 - n :]  # the positions that predict the continuation's tokens
    target = torch.tensor(window[-n:])
    picked = rows.gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((rows.argmax(-1) == target).all())


def test_loglikelihoods_match_full_forward_log_softmax():
    """NeoxLM's per-request (log-likelihood, is_greedy), batched, padded and truncated, against the model's
    full forward per request on a model whose predictions are confident."""
    import torch

    from neox.interop.lm_eval import NeoxLM

    cfg = tiny_config()
    model = random_model(cfg, scale=PEAKED_SCALE)
    tok = _tokenizer(cfg)
    assert_peaked(model, tok.encode("The cat sat on the mat while the dog slept."))
    max_length = 48
    pairs = [
        ("The cat sat on", " the mat"),
        ("One two", " three four five"),
        ("A", "b"),
        # longer than max_length: truncated. (No context ends in a space: the harness would move it into the
        # continuation and score it.)
        ("Colourless green ideas sleep furiously, " * 3 + "they", " said"),
        ("Hello", ", world"),
    ]
    lm = NeoxLM(model, tok, batch_size=2, max_length=max_length)  # three batches of mixed lengths
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    want = [reference_loglikelihood(model, tok.encode(c), tok.encode(x), max_length) for c, x in pairs]
    assert len(tok.encode(pairs[3][0] + pairs[3][1])) > max_length + 1
    for (lp, greedy), (ref_lp, ref_greedy), pair in zip(got, want, pairs):
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4), pair
        assert greedy == ref_greedy, pair
    assert max(abs(a - b) for (a, _), (b, _) in itertools.pairwise(want)) > 1.0  # the scores tell requests apart

    # is_greedy on both sides of the line: the model's own greedy continuation, then one token changed
    ctx = tok.encode("The cat sat on")
    greedy_cont = []
    with torch.no_grad():
        for _ in range(4):
            greedy_cont.append(int(model(torch.tensor([ctx + greedy_cont]))[0, -1].argmax()))
    changed = greedy_cont[:2] + [(greedy_cont[2] + 1) % 256] + greedy_cont[3:]
    scored = lm._loglikelihood_tokens([(None, ctx, greedy_cont), (None, ctx, changed)])
    refs = [reference_loglikelihood(model, ctx, c, max_length) for c in (greedy_cont, changed)]
    assert [g for _, g in scored] == [r for _, r in refs] == [True, False]
    for (lp, _), (ref_lp, _) in zip(scored, refs):
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4)
    assert refs[1][0] < refs[0][0]
