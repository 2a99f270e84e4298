"""lm-eval on MoE models: the adapter's log-likelihoods against a direct forward pass of the neox model and of
its MixtralForCausalLM export, and `neox eval` end to end on a tiny MoE checkpoint against the loaded model."""

import json
from types import SimpleNamespace

import pytest
import torch

from neox.cli import main
from neox.data.tokenizers import build_tokenizer
from tests.infer.tiny import make_run, random_model, tiny_config
from tests.interop.test_hf_mixtral import MIXTRAL_LIKE
from tests.interop.test_lm_eval import PEAKED_SCALE, assert_peaked, reference_loglikelihood

pytest.importorskip("lm_eval")

PAIRS = [
    ("The cat sat on", " the mat"),
    ("One two", " three four five"),
    ("A", "b"),
    ("Colourless green ideas sleep furiously, " * 3 + "they", " said"),  # truncated at max_length 48
    ("Hello", ", world"),
]


def hf_loglikelihood(hf, ctx: list[int], cont: list[int], max_length: int) -> float:
    window = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([window[:-1]])).logits[0].double(), dim=-1)
    rows = logp[len(window) - 1 - len(cont) :]
    return float(rows.gather(1, torch.tensor(window[-len(cont) :])[:, None]).sum())


def test_moe_loglikelihoods_match_forward_and_mixtral_export(tmp_path):
    from neox.interop.lm_eval import NeoxLM
    from tests.interop.hf_tiny import export_and_load

    cfg = tiny_config(**MIXTRAL_LIKE)
    model = random_model(cfg, scale=PEAKED_SCALE)
    tok = build_tokenizer(cfg.tokenizer)
    assert_peaked(model, tok.encode("The cat sat on the mat while the dog slept."))
    max_length = 48
    # batches of mixed lengths, right-padded: in dropless routing a padding token cannot change another's experts
    got = NeoxLM(model, tok, batch_size=2, max_length=max_length).loglikelihood(
        [SimpleNamespace(args=p) for p in PAIRS]
    )
    encoded = [(tok.encode(c), tok.encode(x)) for c, x in PAIRS]
    want = [reference_loglikelihood(model, c, x, max_length) for c, x in encoded]
    for (lp, greedy), (ref_lp, ref_greedy), pair in zip(got, want, PAIRS):
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4), pair
        assert greedy == ref_greedy, pair
    assert max(a for a, _ in want) - min(a for a, _ in want) > 1.0  # the scores tell the requests apart

    hf = export_and_load(cfg, model, tmp_path, tok)
    assert type(hf).__name__ == "MixtralForCausalLM"
    for (lp, _), (c, x), pair in zip(got, encoded, PAIRS):
        assert lp == pytest.approx(hf_loglikelihood(hf, c, x, max_length), rel=1e-4, abs=1e-3), pair


def _pair(ctx: str, cont: str) -> tuple[str, str]:
    # the harness moves a context's trailing spaces into the continuation before encoding
    n = len(ctx) - len(ctx.rstrip(" "))
    return (ctx[: len(ctx) - n], ctx[len(ctx) - n :] + cont) if n else (ctx, cont)


@pytest.mark.slow
def test_neox_eval_scores_a_moe_checkpoint_like_its_forward(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("NEOX_SHARED_DATA", str(shared_data))
    cfg = tiny_config(**MIXTRAL_LIKE, seq_length=256)
    model = random_model(cfg, scale=PEAKED_SCALE)  # what the checkpoint holds
    make_run(tmp_path / "run", cfg, model)
    tasks = "piqa_local,lambada_openai_local"
    args = ["eval", str(tmp_path / "run"), "--tasks", tasks, "--limit", "3", "--log-samples", "--batch-size", "4"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    tok = build_tokenizer(cfg.tokenizer)
    checked = 0
    for task in tasks.split(","):
        assert 0.0 <= res["results"][task]["acc,none"] <= 1.0
        for sample in res["samples"][task]:
            for arguments, resp in zip(sample["arguments"], sample["resps"]):
                ctx, cont = _pair(arguments[0], arguments[1])
                lp, greedy = reference_loglikelihood(model, tok.encode(ctx), tok.encode(cont), 256)
                assert float(resp[0][0]) == pytest.approx(lp, rel=1e-5, abs=1e-4), (task, arguments)
                assert bool(resp[0][1]) == greedy
                checked += 1
    assert checked >= 3 * 2 + 3  # piqa: two choices per example; lambada: one continuation
