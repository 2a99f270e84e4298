"""neox.train.build: the model is built on the meta device and each rank initialises only its shard, with the
same values under every layout (one process, FSDP ZeRO-3, DDP, tensor and pipeline parallelism), and the build
of a 1B-parameter model under ZeRO-3 at 4 processes stays far below a full fp32 copy per rank."""

from __future__ import annotations

import json
import math

import pytest
import torch

from neox.config import from_dict
from neox.config.schema import ModelConfig
from neox.model import init as model_init
from neox.model.init import INPUT, OUTPUT, seeded_rows
from neox.train.build import build_model
from neox.train.loss import masked_mean_loss
from neox.train.precision import Precision
from neox.train.trainer import Layout
from tests.parallel.dist_helpers import HERE as PARALLEL_TESTS
from tests.parallel.dist_helpers import torchrun
from tests.train.build_worker import eval_batch

WORKER = PARALLEL_TESTS.parent / "train" / "build_worker.py"
SMALL_BLOCKS = 96  # elements per seeded block in the layout test: every weight spans several blocks
SEED = 1234
SMALL = dict(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    seq_length=16,
    vocab_size=128,
    intermediate_size=64,
)
MODELS = {
    "tied": {},
    # untied head, learned positions, a gated MLP with biases, xavier and orthogonal methods
    "untied": dict(
        no_weight_tying=True,
        pos_emb="learned",
        activation="swiglu",
        use_bias_in_mlp=True,
        init_method="xavier_uniform",
        output_layer_init_method="orthogonal",
    ),
}
LAYOUTS = {
    "dp2-zero3": dict(zero_stage=3),
    "dp2-zero0": dict(zero_stage=0),
    "tp2": dict(model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipe_parallel_size=2, pipe_schedule="gpipe"),
    "pp2-interleaved": dict(pipe_parallel_size=2, pipe_schedule="interleaved_1f1b", pipe_stages_per_rank=2),
}


def config(model: dict, parallel: dict | None = None) -> dict:
    return {
        "model": {**SMALL, **model},
        "parallel": parallel or {},
        "train": {"seed": SEED, "device": "cpu", "train_micro_batch_size_per_gpu": 1},
    }


def build_here(cfg_dict: dict) -> tuple[dict[str, torch.Tensor], float]:
    """The one-process build's parameters and its loss on the workers' evaluation batch."""
    cfg = from_dict(cfg_dict, source="<test>")
    model, runner = build_model(
        cfg, Layout(), Precision(cfg.precision, "cpu"), torch.device("cpu"), accum=1, loss_fn=masked_mean_loss
    )
    loss = float(runner.eval_loss(eval_batch(cfg.model.vocab_size, cfg.model.seq_length)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, loss


# ---------------------------------------------------------------- the seeded values themselves


@pytest.mark.parametrize("method", ["normal", "xavier_uniform", "xavier_normal", "orthogonal"])
def test_any_slice_of_rows_is_the_slice_of_the_whole(method, monkeypatch):
    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", 50)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, init_method=method)
    shape = (37, 12)  # 4 rows per block: the slices below start and end inside blocks
    whole = seeded_rows(INPUT, cfg, "layers.0.mlp.w1.weight", shape, SEED)
    for start, stop in ((0, 37), (0, 1), (3, 9), (17, 37), (36, 37), (5, 5)):
        part = seeded_rows(INPUT, cfg, "layers.0.mlp.w1.weight", shape, SEED, start, stop)
        assert torch.equal(part, whole[start:stop]), (start, stop)


def test_values_depend_on_seed_and_name_not_on_the_block_size(monkeypatch):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128)
    a = seeded_rows(INPUT, cfg, "embed_in.weight", (64, 32), SEED)
    assert not torch.equal(a, seeded_rows(INPUT, cfg, "embed_out.weight", (64, 32), SEED))
    assert not torch.equal(a, seeded_rows(INPUT, cfg, "embed_in.weight", (64, 32), SEED + 1))
    assert torch.equal(a, seeded_rows(INPUT, cfg, "embed_in.weight", (64, 32), SEED))
    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", 64)  # the block size is part of the definition
    assert not torch.equal(a, seeded_rows(INPUT, cfg, "embed_in.weight", (64, 32), SEED))


def test_seeded_values_follow_the_methods_formulas():
    # the same statistics as tests/model/test_init.py checks for init_weights, from independent formulas
    cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=128)
    w = seeded_rows(INPUT, cfg, "a", (512, 256), SEED)
    assert w.std().item() == pytest.approx(0.02, rel=0.02) and abs(w.mean().item()) < 1e-3
    w = seeded_rows(OUTPUT, cfg, "b", (512, 256), SEED)  # scaled_normal: sigma / sqrt(2 L)
    assert w.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.02)
    cfg.init_method = "xavier_uniform"
    w = seeded_rows(INPUT, cfg, "c", (512, 256), SEED)
    bound = math.sqrt(6 / (512 + 256))
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    cfg.init_method = "orthogonal"
    w = seeded_rows(INPUT, cfg, "d", (128, 256), SEED)
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(128), atol=1e-4, rtol=0)


def test_one_process_build_is_initialised_and_runs():
    cfg = from_dict(config(MODELS["untied"]), source="<test>")
    model, runner = build_model(
        cfg, Layout(), Precision(cfg.precision, "cpu"), torch.device("cpu"), accum=1, loss_fn=masked_mean_loss
    )
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for p in params.values())
    assert bool((params["final_layer_norm.weight"] == 1).all()) and not params["layers.0.mlp.w1.bias"].any()
    assert params["embed_out.weight"].std() > 0 and model.rotary is None
    tokens = torch.randint(0, 128, (1, 17))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, 16)}
    assert math.isfinite(float(runner.eval_loss(batch)))


# ---------------------------------------------------------------- every layout, the same weights


def compare_layouts(tmp_path, nproc: int, layouts: dict, monkeypatch) -> None:
    """Each model under each layout at `nproc` processes: every rank's parameters (DTensor shards gathered)
    equal, bitwise, those of the one-process build, and the layout's evaluation loss matches it."""
    cases = [{"name": f"{m}-{lay}", "config": config(MODELS[m], layouts[lay])} for m in MODELS for lay in layouts]
    (tmp_path / "spec.json").write_text(json.dumps({"block_elements": SMALL_BLOCKS, "cases": cases}))
    torchrun(str(WORKER), nproc, str(tmp_path / "spec.json"), str(tmp_path))

    monkeypatch.setattr(model_init, "BLOCK_ELEMENTS", SMALL_BLOCKS)
    for m in MODELS:
        want, want_loss = build_here(config(MODELS[m]))
        for lay in layouts:
            saved = [torch.load(tmp_path / f"{m}-{lay}.rank{r}.pt") for r in range(nproc)]
            for r, out in enumerate(saved):
                assert out["eval_loss"] == pytest.approx(want_loss, abs=1e-5), f"{m} {lay} rank {r}"
            ranks = [out["params"] for out in saved]
            assert set().union(*ranks) == set(want), (m, lay)  # between them the ranks hold every parameter
            for r, got in enumerate(ranks):
                for name, value in got.items():
                    assert torch.equal(value, want[name]), f"{m} {lay} rank {r}: {name}"
            if m == "tied" and "pipe_parallel_size" in layouts[lay]:
                # the last stage's copy of the tied embedding is the first stage's weight (checked equal above)
                assert all("embed_in.weight" in got for got in ranks), lay


def test_initial_weights_identical_under_every_layout(tmp_path, monkeypatch):
    compare_layouts(tmp_path, 2, LAYOUTS, monkeypatch)


@pytest.mark.slow
def test_initial_weights_identical_under_2d_layouts(tmp_path, monkeypatch):
    # FSDP over a tensor-parallel dim shards the TP shards again (a strided placement: drawn whole, then cut)
    layouts = {
        "dp2xtp2-zero3": dict(zero_stage=3, model_parallel_size=2, sequence_parallel=True),
        "pp2xdp2-zero3": dict(zero_stage=3, pipe_parallel_size=2, pipe_schedule="gpipe"),
        "pp2xtp2": dict(pipe_parallel_size=2, pipe_schedule="gpipe", model_parallel_size=2, sequence_parallel=True),
    }
    compare_layouts(tmp_path, 4, layouts, monkeypatch)


# ---------------------------------------------------------------- memory at scale

BIG = dict(  # 16 x 2048 with GPT-NeoX's padded vocabulary, untied: 1.01e9 parameters, 4.04 GB in fp32
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=16,
    seq_length=2048,
    vocab_size=50304,
    no_weight_tying=True,
)


@pytest.mark.slow
def test_zero3_build_of_1b_model_stays_under_40_percent_of_fp32_per_rank(tmp_path):
    cfg = {"model": BIG, "parallel": {"zero_stage": 3}, "train": {"seed": SEED, "device": "cpu"}}
    spec = {"memory": True, "cases": [{"name": "big", "config": cfg}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(str(WORKER), 4, str(tmp_path / "spec.json"), str(tmp_path), timeout=240)
    records = [json.loads((tmp_path / f"big.rank{r}.json").read_text()) for r in range(4)]
    full = records[0]["full_fp32"]
    assert full > 4.0e9  # the config really is a 1B-parameter model
    for r, rec in enumerate(records):
        assert rec["local"] == pytest.approx(full / 4, rel=0.01)  # the rank holds its quarter, and no more
        assert rec["grown"] <= 0.40 * full, f"rank {r}: RSS grew {rec['grown'] / 1e9:.2f} GB of {full / 1e9:.2f}"
    print("peak RSS growth per rank (GB):", [round(rec["grown"] / 1e9, 3) for rec in records], "full", full / 1e9)
