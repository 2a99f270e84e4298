"""Weight-decay grouping and optimizer choice."""

import pytest
import torch
from torch import nn

from neox.config.schema import OptimizerConfig
from neox.errors import ConfigError
from neox.train.optim import build_optimizer, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_in = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4, bias=False)
        self.frozen.weight.requires_grad_(False)


def test_biases_and_norms_are_not_decayed():
    m = Tiny()
    names = {id(p): n for n, p in m.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in param_groups(m, 0.1)}
    assert groups["decay"] == ["embed_in.weight", "proj.weight"]
    assert groups["no_decay"] == ["norm.weight", "norm.bias", "proj.bias"]
    wd = {g["name"]: g["weight_decay"] for g in param_groups(m, 0.1)}
    assert wd == {"decay": 0.1, "no_decay": 0.0}


def test_adamw_decays_weights_but_not_biases():
    m = Tiny()
    opt = build_optimizer(m, OptimizerConfig(type="adamw", lr=0.5, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    w0, b0 = m.proj.weight.detach().clone(), m.proj.bias.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    torch.testing.assert_close(m.proj.weight, w0 * (1 - 0.5 * 0.1))
    torch.testing.assert_close(m.proj.bias, b0)


def test_other_types_and_errors():
    assert type(build_optimizer(Tiny(), OptimizerConfig(type="adam"))) is torch.optim.Adam
    assert type(build_optimizer(Tiny(), OptimizerConfig(type="sgd", momentum=0.9))) is torch.optim.SGD
    with pytest.raises(ConfigError, match="optimizer.type"):
        build_optimizer(Tiny(), OptimizerConfig(type="lamb"))
