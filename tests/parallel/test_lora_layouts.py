"""LoRA under data, tensor and pipeline parallelism: ZeRO-3 (FSDP2 shards of frozen weights and adapters), DDP,
tp2 (adapters placed to match their column- or row-parallel base layer, neox.parallel.tensor) and pp2 (each
stage holds its own layers' adapters; the adapter files gather them over the stages) over two ranks fine-tune
a one-process checkpoint to one process's losses; the base weights in their checkpoints are the pretrained
ones bitwise and the adapter files hold the gathered adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from neox.model.lora import is_adapter_key
from neox.train import checkpoint as ckpt
from neox.train.adapters import ADAPTER_WEIGHTS
from neox.train.trainer import Trainer
from tests.parallel.dist_helpers import torchrun
from tests.train.tiny_run import make_corpus, tiny_config

ITERS = 4
# the vocabulary pinned to tp2's padding (384), so the one-process base checkpoint loads under tp2
MODEL = {"pos_emb": "rotary", "no_weight_tying": True, "vocab_size": 384}
# column-parallel (query_key_value, dense_h_to_4h, embed_out) and row-parallel (dense, dense_4h_to_h) layers
LORA = {
    "rank": 4,
    "alpha": 8.0,
    "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "embed_out"],
}
LAYOUTS = {"zero3": {"zero_stage": 3}, "ddp": {"zero_stage": 0}, "tp2": {"model_parallel_size": 2}}
# each stage holds its layers' adapters (embed_out's on the last); 4 micro-batches per step
PIPELINES = {"pp2": {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"}}
# tied embeddings: the last stage's copy of the frozen embedding (the output layer) stays frozen too
TIED = {"pos_emb": "rotary", "vocab_size": 384}
TIED_LORA = {**LORA, "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}


def groups(run, base, parallel=None, model=MODEL, lora=LORA) -> dict:
    return {
        "model": model,
        "lora": lora,
        "optimizer": {"lr": 2e-2},
        "eval": {"eval_iters": 0},
        "logging": {"log_interval": 1},
        "train": {"train_iters": ITERS, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 4},
        "checkpoint": {"save": str(run), "load": str(base), "finetune": True, "save_interval": ITERS},
        "parallel": parallel or {},
    }


@pytest.mark.slow
def test_lora_under_zero3_and_ddp_matches_one_process(tmp_path):
    check_layouts(tmp_path, LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("model, lora", [(MODEL, LORA), (TIED, TIED_LORA)], ids=["untied", "tied"])
def test_lora_under_pp2_matches_one_process(tmp_path, model, lora):
    check_layouts(tmp_path, PIPELINES, model, lora)


def check_layouts(tmp_path, layouts: dict, model=MODEL, lora=LORA) -> None:
    torch.set_num_threads(1)
    corpus = make_corpus(tmp_path / "corpus", docs=200)
    base = tmp_path / "base"
    pre = Trainer(tiny_config(corpus, base, model=model, train={"train_iters": 4}, eval={"eval_iters": 0}), quiet=True)
    pre.fit()
    base_sd = {k: v.detach().clone() for k, v in pre.model.state_dict().items()}

    runs = [{"name": n, "groups": groups(tmp_path / n, base, p, model, lora)} for n, p in layouts.items()]
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"data": corpus, "runs": runs}))
    torchrun("trainer_worker.py", 2, str(spec), str(out))
    got = json.loads(out.read_text())

    one = Trainer(tiny_config(corpus, **groups(tmp_path / "one", base, None, model, lora)), quiet=True)
    one.fit()
    assert len(set(one.losses)) > 1
    want = {k: v for k, v in one.model.state_dict().items() if is_adapter_key(k)}
    for name in layouts:
        assert got[name] == pytest.approx(one.losses, abs=1e-5), name
        last = ckpt.resolve(tmp_path / name)
        saved = ckpt.load_full_model_state(last)
        for k, v in base_sd.items():
            assert torch.equal(saved[k], v), (name, k)
        files = load_file(str(last / ADAPTER_WEIGHTS))
        assert sorted(files) == sorted(want), name
        for k, v in want.items():
            assert torch.equal(files[k], saved[k]) and torch.allclose(files[k], v, atol=1e-5), (name, k)
