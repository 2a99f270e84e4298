"""configs/post-training/: each config loads over the config it extends, and the bundled chat template renders
a conversation as the sum of its turns."""

from __future__ import annotations

from pathlib import Path

import pytest

from neox.config import load
from neox.data.chat import load_template

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPECTED = {
    "sft-chat-tiny.yml": ("tiny-cpu.yml", "normal"),
    "dpo-tiny.yml": ("tiny-cpu.yml", "dpo"),
    "kto-tiny.yml": ("tiny-cpu.yml", "kto"),
    "rm-tiny.yml": ("tiny-cpu.yml", "rm"),
    "reinforce-tiny.yml": ("tiny-cpu.yml", "reinforce"),
    "dpo-pythia-70m.yml": ("pythia-70m.yml", "dpo"),
    "lora-tiny.yml": ("tiny-cpu.yml", "normal"),
    "distill-tiny.yml": ("tiny-cpu.yml", "distill"),
}


def test_every_post_training_config_is_listed():
    assert sorted(p.name for p in (CONFIGS / "post-training").glob("*.yml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_post_training_config_loads(name):
    base, impl = EXPECTED[name]
    cfg = load([str(CONFIGS / base), str(CONFIGS / "post-training" / name)])
    assert cfg.train.train_impl == impl
    if impl == "distill":  # a new, smaller student from scratch; the trained model is its teacher
        assert cfg.train.distill_teacher and not cfg.checkpoint.load
        assert cfg.model.num_layers < load([str(CONFIGS / base)]).model.num_layers
    else:
        assert cfg.checkpoint.finetune and cfg.checkpoint.load
    if name == "lora-tiny.yml":
        assert cfg.lora.rank > 0


def test_bundled_chatml_template():
    tpl = load_template(str(CONFIGS / "post-training" / "chatml.jinja"), None)
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
    assert tpl.segments(conv, "assistant") == [
        ("<|im_start|>user\nHi?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
    ]
