"""muP: width multipliers against the shapes of a real base model, the forward multipliers against their
formulas, the initialisation's scale, the optimizer's per-group rates, and the coordinate check."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from neox.cli import main as cli_main
from neox.config import from_dict, load, to_dict
from neox.config.schema import OptimizerConfig, ScheduleConfig
from neox.errors import ConfigError
from neox.model import GPT, mup
from neox.model.attention import build_attention_inputs
from neox.model.init import INPUT, OUTPUT, parameter_rules, seeded_rows
from neox.train.coord_check import coord_check
from neox.train.optim import build_optimizer
from neox.train.schedule import LRSchedule
from neox.train.trainer import Trainer
from tests.train.tiny_run import make_corpus
from tests.train.tiny_run import tiny_config as train_config


def cfg_of(**over):
    base = {"vocab_size": 96, "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 16}
    return from_dict({**base, **over}).model


CASES = {
    "gelu-tied": {},
    "swiglu-gqa-untied": {"activation": "swiglu", "norm": "rmsnorm", "num_kv_heads": 2, "no_weight_tying": True},
    "qknorm-learned-rpe": {"use_qk_layernorm": True, "pos_emb": "rpe"},
    "explicit-mlp-fewer-base-heads": {"intermediate_size": 300, "mup_base_num_attention_heads": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_dim_multipliers_are_the_shape_ratios_of_the_base_model(case):
    m = cfg_of(use_mup=True, mup_base_hidden_size=32, **CASES[case])
    base = dataclasses.replace(
        m,
        hidden_size=32,
        num_attention_heads=mup.base_heads(m),
        num_kv_heads=m.num_kv_heads * mup.base_heads(m) // m.num_attention_heads,
        intermediate_size=round(mup.base_intermediate_size(m)),
        use_mup=False,
        mup_base_hidden_size=None,
        mup_base_num_attention_heads=None,
    )
    with torch.device("meta"):
        target, reference = dict(GPT(m).named_parameters()), dict(GPT(base).named_parameters())
    assert target.keys() == reference.keys()
    for name, p in target.items():
        want = tuple(a / b for a, b in zip(p.shape, reference[name].shape))
        got = mup.dim_multipliers(m, name, tuple(p.shape))
        assert got == pytest.approx(want), name
    # wrappers' name segments do not change the answer
    qkv = "layers.0.attention.query_key_value.weight"
    wrapped = "module._orig_mod.layers.0._checkpoint_wrapped_module.attention.query_key_value.weight"
    assert mup.dim_multipliers(m, wrapped, tuple(target[qkv].shape)) == mup.dim_multipliers(m, qkv, target[qkv].shape)


def test_base_intermediate_follows_the_default_rule():
    m = cfg_of(use_mup=True, mup_base_hidden_size=64, activation="swiglu")  # 8/3 rounded up to 256s
    assert (m.intermediate_size, mup.base_intermediate_size(m)) == (512, 256)


def test_attention_scores_are_scaled_by_one_over_head_dim_and_temperature():
    m = cfg_of(use_mup=True, mup_attn_temp=2.0, pos_emb="none", num_kv_heads=2)
    model = GPT(m).eval()
    attn, x = model.layers["0"].attention, torch.randn(2, 7, 128)
    hd, g = 32, 2
    qkv = attn.query_key_value(x).view(2, 7, 2, g + 2, hd)
    q = qkv[:, :, :, :g].reshape(2, 7, 4, hd).transpose(1, 2)
    k = qkv[:, :, :, g].transpose(1, 2).repeat_interleave(g, dim=1)
    v = qkv[:, :, :, g + 1].transpose(1, 2).repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-1, -2) / (hd * 2.0)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    want = attn.dense((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 128))
    inputs = _inputs(model, x)
    torch.testing.assert_close(attn(x, inputs), want, atol=1e-5, rtol=1e-5)


def _inputs(model, x):
    pos = torch.arange(x.shape[1])[None]
    return build_attention_inputs(model, x.shape[0], x.shape[1], pos, None, None, x.dtype, x.device)


def test_logit_and_embedding_multipliers():
    m = cfg_of(use_mup=True, mup_base_hidden_size=32, mup_output_temp=0.5, mup_embedding_mult=3.0)
    model = GPT(m).eval()
    seen = {}
    model.final_layer_norm.register_forward_hook(lambda mod, i, o: seen.setdefault("normed", o))
    model.embed_dropout.register_forward_hook(lambda mod, i, o: seen.setdefault("embedded", i[0]))
    tokens = torch.randint(0, 96, (2, 5))
    logits = model(tokens)
    # width multiplier 128 / 32 = 4: logits / (0.5 * 4)
    torch.testing.assert_close(logits, F.linear(seen["normed"], model.embed_in.weight) / 2.0)
    torch.testing.assert_close(seen["embedded"], model.embed_in(tokens) * 3.0)


def test_without_mup_nothing_changes():
    m = cfg_of()
    assert (mup.query_scale(m), mup.output_multiplier(m), mup.embedding_multiplier(m)) == (1.0, 1.0, 1.0)
    assert all(mup.init_multiplier(m, n, tuple(p.shape)) == 1.0 for n, p in GPT(m).named_parameters())


@pytest.mark.parametrize("path", ["init_weights", "seeded_rows"])
def test_hidden_matrices_start_with_std_over_sqrt_fan_in_multiplier(path):
    m = cfg_of(hidden_size=256, use_mup=True, mup_base_hidden_size=64, mup_init_scale=1.5)
    torch.manual_seed(0)
    model = GPT(m)
    for name, p, rule in parameter_rules(model):
        if rule not in (INPUT, OUTPUT):
            continue
        value = p if path == "init_weights" else seeded_rows(rule, m, name, tuple(p.shape), seed=3)
        sp_std = 0.02 if rule == INPUT else 0.02 / math.sqrt(2 * m.num_layers)
        matrix = name.startswith("layers.")  # both dims grow 4x: std / sqrt(4); embeddings keep theirs
        want = 1.5 * sp_std / (2.0 if matrix else 1.0)
        assert value.std().item() == pytest.approx(want, rel=0.06), name


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_per_group_learning_rates(kind):
    m = cfg_of(hidden_size=256, use_mup=True, mup_base_hidden_size=64, no_weight_tying=True)
    model = GPT(m)
    opt = build_optimizer(model, OptimizerConfig(type=kind, lr=1.0, weight_decay=0.1), m)
    LRSchedule(ScheduleConfig(lr_decay_style="constant", warmup=0.0), 0.5, 10).apply(opt, 3)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    adam = kind != "sgd"
    want = {  # muP's MuAdam / MuSGD rules at width multiplier 4
        "layers.0.attention.query_key_value.weight": 1 / 4 if adam else 1.0,
        "layers.1.mlp.dense_4h_to_h.weight": 1 / 4 if adam else 1.0,
        "layers.0.attention.query_key_value.bias": 1.0 if adam else 4.0,
        "layers.0.input_layernorm.weight": 1.0 if adam else 4.0,
        "embed_in.weight": 1.0 if adam else 4.0,
        "embed_out.weight": 1.0 if adam else 4.0,
    }
    for name, scale in want.items():
        g = group_of[id(params[name])]
        assert g["lr"] == pytest.approx(0.5 * scale), name
        decayed = params[name].ndim == 2
        assert g["weight_decay"] == pytest.approx(0.1 / scale if decayed else 0.0), name


def test_standard_groups_are_unchanged():
    m = cfg_of()
    opt = build_optimizer(GPT(m), OptimizerConfig(type="adamw", weight_decay=0.1), m)
    assert [(g["name"], g["lr_scale"]) for g in opt.param_groups] == [("decay", 1.0), ("no_decay", 1.0)]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"mup_base_hidden_size": 32}, "mup_base_hidden_size': has no effect without use_mup: true"),
        ({"use_mup": True, "mup_attn_temp": 0}, "mup_attn_temp': must be positive"),
        ({"use_mup": True, "mup_base_hidden_size": 30}, "base width 30 is not divisible by its 4 attention heads"),
        ({"mup_rp_embedding_mult": 2.0}, "mup_rp_embedding_mult"),
        ({"base_shapes_file": "shapes.bsh"}, "mup_base_hidden_size"),
    ],
)
def test_config_errors_are_one_line(over, message):
    with pytest.raises(ConfigError, match=message) as e:
        cfg_of(**over)
    assert "\n" not in str(e.value)


def test_coord_check_sgd_flat_with_mup_growing_without():
    cfg = from_dict(
        {
            "vocab_size": 256,
            "num_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "no_weight_tying": True,
            "use_mup": True,
            "optimizer": {"type": "sgd", "lr": 0.3},
        }
    )
    r = coord_check(cfg, [64, 128, 256], steps=4, batch_size=4, seq_length=32)
    for layer in ("layer.0", "layer.1"):
        assert abs(r["slopes"]["mup"][layer]) < 0.3, r["slopes"]
        assert r["slopes"]["sp"][layer] > 0.5, r["slopes"]


def test_coord_check_command_writes_png_and_numbers(tmp_path):
    config = tmp_path / "mup.yml"
    config.write_text(
        "vocab_size: 256\nnum_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nno_weight_tying: true\n"
        "use_mup: true\noptimizer: {type: adamw, lr: 0.01}\n"
    )
    out = tmp_path / "plots" / "coord.png"
    argv = ["mup", "coord-check", str(config), "--widths", "64,128,256", "--steps", "5", "--out", str(out)]
    assert cli_main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["widths"] == [64, 128, 256] and len(r["mup"]["layer.1"]) == 5
    # the slopes are recomputed from the numbers, not trusted
    for mode in ("mup", "sp"):
        for layer in ("layer.0", "layer.1"):
            values = r[mode][layer][-1]
            slope = (math.log(values[2]) - math.log(values[0])) / math.log(4)
            if mode == "mup":
                assert abs(slope) < 0.6, (layer, values)  # flat: within a factor 2.3 over 4x the width
            else:
                assert slope > 1.2, (layer, values)  # grows faster than the width itself


def test_trainer_builds_mup_init_and_groups_and_resumes_exactly(tmp_path):
    prefix = make_corpus(tmp_path / "corpus", docs=120)
    model = {"hidden_size": 64, "use_mup": True, "mup_base_hidden_size": 32}
    groups = dict(model=model, eval={"eval_iters": 0})
    straight = Trainer(train_config(prefix, tmp_path / "a", **groups), quiet=True)
    qkv = straight.model.layers["0"].attention.query_key_value.weight
    assert qkv.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.1)  # the layout-independent init path
    straight.fit()
    scales = sorted({g["lr_scale"] for g in straight.optimizer.param_groups})
    assert scales == [0.5, 1.0]
    lr = straight.schedule.lr_at(19)
    assert {g["lr"] for g in straight.optimizer.param_groups} == {lr * 0.5, lr}
    first = Trainer(train_config(prefix, tmp_path / "b", **groups), quiet=True)
    first.fit(stop_at=10)
    resumed = Trainer(
        train_config(prefix, tmp_path / "b", checkpoint={"load": str(tmp_path / "b")}, **groups), quiet=True
    )
    resumed.fit()
    assert first.losses + resumed.losses == straight.losses


def test_base_shapes_from_a_base_config_file(tmp_path):
    (tmp_path / "base.yml").write_text("hidden_size: 32\nnum_attention_heads: 2\nactivation: swiglu\n")
    (tmp_path / "big.yml").write_text(
        f"hidden_size: 128\nnum_attention_heads: 4\nactivation: swiglu\nuse_mup: true\n"
        f"mup_base_config: {tmp_path / 'base.yml'}\nmup_base_num_attention_heads: 4\n"
    )
    cfg = load([str(tmp_path / "big.yml")])
    m = cfg.model
    # unset fields come from the base's model (its derived MLP width too); a given one stays
    assert (m.mup_base_hidden_size, m.mup_base_num_attention_heads, m.mup_base_intermediate_size) == (32, 4, 256)
    (tmp_path / "base.yml").unlink()  # a checkpoint's config.yml holds the widths: no file needed to resume
    assert from_dict(to_dict(cfg)).model == m
    with pytest.raises(ConfigError, match="mup_base_config': .*nope.yml is not a file"):
        from_dict({"use_mup": True, "mup_base_config": str(tmp_path / "nope.yml")})
    with pytest.raises(ConfigError, match="mup_base_config': has no effect without use_mup"):
        from_dict({"mup_base_config": "base.yml"})


@pytest.mark.cuda
def test_mup_and_dynamic_rope_model_on_cuda_matches_cpu():
    m = cfg_of(
        use_mup=True,
        mup_base_hidden_size=32,
        max_position_embeddings=256,
        rope_scaling={"type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 64},
    )
    torch.manual_seed(0)
    model = GPT(m).eval()
    tokens = torch.randint(0, 96, (2, 200))  # past the original context: the per-forward frequencies
    with torch.no_grad():
        want = model(tokens)
        got = model.cuda()(tokens.cuda()).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
