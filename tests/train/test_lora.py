"""LoRA fine-tuning through the Trainer: only adapters change, a plain checkpoint loads under them, resume is
exact, each checkpoint carries the adapters on their own, and the merged export gives the unmerged logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from neox.config import from_dict, to_dict
from neox.errors import ConfigError
from neox.infer.api import build_model as build_inference_model
from neox.model.lora import is_adapter_key
from neox.train import checkpoint as ckpt
from neox.train.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config

NO_EVAL = {"eval_iters": 0}
MODEL = {"pos_emb": "rotary", "no_weight_tying": True}  # a model neox export hf takes
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": TARGETS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=200)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A pretrained run (no LoRA) to fine-tune from."""
    run = tmp_path_factory.mktemp("base")
    t = Trainer(tiny_config(corpus, run, train={"train_iters": 6}, eval=NO_EVAL, model=MODEL), quiet=True)
    t.fit()
    return run, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def lora_config(corpus, run, base_run=None, **groups):
    load = {"load": str(base_run), "finetune": True} if base_run else {}
    d = {
        "train": {"train_iters": 8},
        "eval": NO_EVAL,
        "model": MODEL,
        "lora": LORA,
        "optimizer": {"lr": 2e-2},  # adapters starting at zero want a larger rate than full fine-tuning
        "logging": {"log_interval": 1},
        "checkpoint": {"save_interval": 4, **load},
    }
    for group, values in groups.items():
        d[group] = {**d.get(group, {}), **values}
    return tiny_config(corpus, run, **d)


def state(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_only_adapters_train_from_a_pretrained_checkpoint(corpus, base, tmp_path):
    base_run, base_sd = base
    t = Trainer(lora_config(corpus, tmp_path / "ft", base_run), quiet=True)
    start = state(t)
    adapters = sorted(k for k in start if is_adapter_key(k))
    assert len(adapters) == 2 * 4 * 2  # A and B on four linears in each of two layers
    # the base weights are the checkpoint's, bitwise; B starts at zero, A does not
    assert {k for k in start if not is_adapter_key(k)} == set(base_sd)
    assert all(torch.equal(start[k], v) for k, v in base_sd.items())
    assert all(not start[k].any() for k in adapters if k.endswith("lora_B"))
    assert all(start[k].std() > 0 for k in adapters if k.endswith("lora_A"))
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters)
    t.fit()
    end = state(t)
    for k, v in base_sd.items():
        assert torch.equal(end[k], v), f"{k} changed"
    assert all(not torch.equal(end[k], start[k]) for k in adapters), "every adapter trains"
    assert t.losses[-1] < t.losses[0]

    # each checkpoint holds the adapters on their own, equal to the model's at that step
    last = tmp_path / "ft" / "iter_0000008"
    files = load_file(str(last / ADAPTER_WEIGHTS))
    assert sorted(files) == adapters and all(torch.equal(files[k], end[k]) for k in adapters)
    meta = json.loads((last / ADAPTER_CONFIG).read_text())
    assert meta["rank"] == 4 and meta["scale"] == 2.0 and meta["target_modules"] == TARGETS
    assert (tmp_path / "ft" / "iter_0000004" / ADAPTER_WEIGHTS).is_file()
    ckpt.resolve(tmp_path / "ft", verify=True)  # the manifest covers the adapter files

    # inference merges them: the same logits as the unmerged model, and no adapter left
    cfg = from_dict(ckpt.saved_config(last))
    merged = build_inference_model(cfg, last)
    assert not any(is_adapter_key(k) for k in merged.state_dict())
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    t.model.eval()
    with torch.no_grad():
        want = t.model(ids)
        assert (merged(ids) - want).abs().max().item() < 1e-5
    # merging changed the weights: the adapters were not a no-op
    assert not torch.equal(
        merged.state_dict()["layers.0.attention.dense.weight"], base_sd["layers.0.attention.dense.weight"]
    )


def test_merged_hf_export_matches_the_unmerged_model(corpus, base, tmp_path):
    transformers = pytest.importorskip("transformers")
    from neox.interop.hf import export_checkpoint

    t = Trainer(lora_config(corpus, tmp_path / "ft", base[0], train={"train_iters": 4}), quiet=True)
    t.fit()
    export_checkpoint(tmp_path / "ft", tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    t.model.eval()
    with torch.no_grad():
        assert (hf(ids).logits - t.model(ids)).abs().max().item() < 1e-5


def test_resume_restores_the_adapters_exactly(corpus, base, tmp_path):
    straight = Trainer(lora_config(corpus, tmp_path / "a", base[0]), quiet=True)
    straight.fit()
    first = Trainer(lora_config(corpus, tmp_path / "b", base[0]), quiet=True)
    first.fit(stop_at=4)
    resumed = Trainer(lora_config(corpus, tmp_path / "b", checkpoint={"load": str(tmp_path / "b")}), quiet=True)
    assert resumed.iteration == 4
    resumed.fit()
    assert first.losses + resumed.losses == straight.losses  # bitwise
    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lora_settings_are_one_line_errors(corpus, tmp_path):
    def load(**lora):
        d = to_dict(tiny_config(corpus, None, model=MODEL))
        d["lora"] = {"rank": 4, **lora}
        return from_dict(d, source="x.yml")

    for lora, match in [
        ({"target_modules": ["qkv"]}, r"lora.target_modules.*'qkv' is not a linear layer .*query_key_value"),
        ({"target_modules": []}, r"lora.target_modules.*at least one"),
        ({"alpha": 0}, r"lora.alpha.*above 0"),
        ({"dropout": 1.0}, r"lora.dropout.*\[0, 1\)"),
        ({"rank": -1}, r"lora.rank.*at least 0"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            load(**lora)
        assert "\n" not in str(e.value)
    d = to_dict(tiny_config(corpus, None, model=MODEL))
    d["lora"] = {"rank": 4}
    d["parallel"] = {"pipe_parallel_size": 2}
    assert from_dict(d).parallel.pipe_parallel_size == 2  # LoRA runs under pipeline stages (test_lora_layouts)
    # a known layer name that this model lacks (w1 belongs to gated MLPs) is refused when the model is built
    cfg = load(target_modules=["w1"])
    with pytest.raises(ConfigError, match=r"'w1' names no linear layer of this model; choose from .*dense_h_to_4h"):
        Trainer(cfg, quiet=True)
