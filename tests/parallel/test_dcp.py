"""Consolidating sharded checkpoints into one file, and the background saver, in one process."""

from __future__ import annotations

import torch

from neox.cli import main
from neox.config.schema import ModelConfig
from neox.model import GPT
from neox.parallel.dcp import AsyncSaver
from neox.train import checkpoint as ckpt
from neox.train.checkpoint import load_full_model_state

CFG = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    vocab_size=64,
    seq_length=8,
    no_weight_tying=True,
)


def _trained():
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def test_consolidate_round_trip(tmp_path, capsys):
    model, opt = _trained()
    ckpt.save(tmp_path / "run", 3, model, opt, {"consumed_samples": 6}, {"model": {}})
    assert main(["checkpoint", "consolidate", str(tmp_path / "run"), str(tmp_path / "out" / "model.pt")]) == 0
    assert "iter_0000003" in capsys.readouterr().out
    saved = torch.load(tmp_path / "out" / "model.pt")
    assert saved["config"] == {"model": {}}  # the checkpoint's config.yml, as saved
    state = saved["model"]
    assert set(state) == set(model.state_dict())
    fresh = GPT(CFG)
    fresh.load_state_dict(state)
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    assert main(["checkpoint", "consolidate", str(tmp_path / "run"), str(tmp_path / "half.pt"), "--dtype", "bf16"]) == 0
    assert torch.load(tmp_path / "half.pt")["model"]["embed_in.weight"].dtype == torch.bfloat16


def test_consolidate_rejects_a_non_checkpoint(tmp_path, capsys):
    assert main(["checkpoint", "consolidate", str(tmp_path), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint" in err and err[-1] == "\n" and err.count("\n") == 1


def test_async_saver_runs_on_done_after_the_write(tmp_path):
    model, _ = _trained()
    saver = AsyncSaver()
    done = []
    saver.save({"model": model.state_dict()}, tmp_path / "a", on_done=lambda: done.append("a"))
    with torch.no_grad():  # the saved copy was staged before save() returned
        model.embed_in.weight.add_(1.0)
    saver.save({"model": model.state_dict()}, tmp_path / "b", on_done=lambda: done.append("b"))
    assert done == ["a"] and saver.busy
    saver.wait()
    assert done == ["a", "b"] and not saver.busy
    a, b = load_full_model_state(tmp_path / "a"), load_full_model_state(tmp_path / "b")
    torch.testing.assert_close(b["embed_in.weight"], a["embed_in.weight"] + 1.0)
