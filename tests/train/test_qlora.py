"""QLoRA through the Trainer: a full-precision checkpoint is quantized as it loads, only the adapters train,
the 4-bit codes stay put, resume is bitwise, and the merged export gives the unmerged quantized logits."""

import json

import pytest
import torch

from neox.config import from_dict, to_dict
from neox.errors import ConfigError
from neox.infer.api import build_model as build_inference_model
from neox.kernels import nf4
from neox.model.lora import is_adapter_key
from neox.model.qlora import Linear4bit, is_quantized_key, quantized_bytes
from neox.train import checkpoint as ckpt
from neox.train.adapters import ADAPTER_CONFIG
from neox.train.trainer import Trainer

from .tiny_run import make_corpus, tiny_config

MODEL = {"pos_emb": "rotary", "no_weight_tying": True, "hidden_size": 64}
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
QLORA = {"rank": 4, "alpha": 8.0, "target_modules": TARGETS, "quantize": "nf4", "double_quant": True}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), docs=200)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A full-precision pretrained run to fine-tune from."""
    run = tmp_path_factory.mktemp("base")
    t = Trainer(tiny_config(corpus, run, train={"train_iters": 6}, eval={"eval_iters": 0}, model=MODEL), quiet=True)
    t.fit()
    return run, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def qlora_config(corpus, run, base_run=None, **groups):
    d = {
        "train": {"train_iters": 8},
        "eval": {"eval_iters": 0},
        "model": MODEL,
        "lora": QLORA,
        "optimizer": {"lr": 2e-2},
        "logging": {"log_interval": 1},
        "checkpoint": {"save_interval": 4, **({"load": str(base_run), "finetune": True} if base_run else {})},
    }
    for group, values in groups.items():
        d[group] = {**d.get(group, {}), **values}
    return tiny_config(corpus, run, **d)


def state(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_quantized_at_load_only_adapters_train_and_export_merges(corpus, base, tmp_path):
    base_run, base_sd = base
    t = Trainer(qlora_config(corpus, tmp_path / "ft", base_run), quiet=True)
    start = state(t)
    layers = {p for p, m in t.model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 4 * 2
    for path in layers:  # the codes are the checkpoint's full-precision weight, quantized
        want = nf4.quantize(base_sd[f"{path}.weight"], "nf4", double_quant=True)
        assert f"{path}.weight" not in start
        assert torch.equal(start[f"{path}.weight_4bit"], want.data)
        assert torch.equal(start[f"{path}.weight_absmax_q"], want.absmax_q)
    stored, weights = quantized_bytes(t.model)
    assert stored / weights == pytest.approx(0.5 + 1 / 64 + 8 / (64 * 256), abs=2e-3)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in start if is_adapter_key(k)}
    t.fit()
    end = state(t)
    assert t.losses[-1] < t.losses[0], t.losses
    for k in start:
        assert torch.equal(end[k], start[k]) != (is_adapter_key(k)), f"{k}: only adapters change"

    last = tmp_path / "ft" / "iter_0000008"
    assert any(is_quantized_key(k) for k in ckpt.tensor_entries(last))  # the run's checkpoints hold the codes
    assert json.loads((last / ADAPTER_CONFIG).read_text())["quantize"] == "nf4"
    merged = build_inference_model(from_dict(ckpt.saved_config(last)), last)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    assert not any(is_adapter_key(k) for k in merged.state_dict())
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    t.model.eval()
    with torch.no_grad():
        want = t.model(ids)
        assert (merged(ids) - want).abs().max().item() < 1e-5

    transformers = pytest.importorskip("transformers")
    from neox.interop.hf import export_checkpoint

    export_checkpoint(tmp_path / "ft", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max().item() < 1e-5


def test_resume_is_bitwise(corpus, base, tmp_path):
    lora = {**QLORA, "quantize": "fp4", "double_quant": False, "quantize_all": True}
    straight = Trainer(qlora_config(corpus, tmp_path / "a", base[0], lora=lora), quiet=True)
    straight.fit()
    first = Trainer(qlora_config(corpus, tmp_path / "b", base[0], lora=lora), quiet=True)
    first.fit(stop_at=4)
    resumed = Trainer(
        qlora_config(corpus, tmp_path / "b", lora=lora, checkpoint={"load": str(tmp_path / "b")}), quiet=True
    )
    assert resumed.iteration == 4
    resumed.fit()
    assert first.losses + resumed.losses == straight.losses
    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "embed_out.weight_4bit" in a  # quantize_all reaches the untied head too


def test_bad_qlora_settings_are_one_line_errors(corpus):
    def load(lora, **groups):
        d = to_dict(tiny_config(corpus, None, model=MODEL))
        d["lora"] = lora
        d.update(groups)
        return from_dict(d, source="x.yml")

    for lora, groups, match in [
        ({"quantize": "nf4"}, {}, r"lora.quantize.*set lora.rank > 0"),
        ({"rank": 4, "double_quant": True}, {}, r"lora.double_quant.*no effect without lora.quantize"),
        ({"rank": 4, "quantize": "int4"}, {}, r"quantize.*int4"),
        ({"rank": 4, "quantize": "nf4"}, {"parallel": {"pipe_parallel_size": 2}}, r"lora.quantize.*one process"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            load(lora, **groups)
        assert "\n" not in str(e.value)


def test_data_parallel_qlora_is_refused_in_one_line():
    from neox.config.schema import LoraConfig
    from neox.train.adapters import quantize_base

    with pytest.raises(ConfigError, match=r"lora.quantize: .*one process only for now, not 2") as e:
        quantize_base(torch.nn.Linear(4, 4), LoraConfig(rank=2, quantize="nf4"), world_size=2)
    assert "\n" not in str(e.value)
