"""fp16 loss scaler (DeepSpeed DynamicLossScaler semantics) and precision modes."""

import pytest
import torch

from neox.config.schema import PrecisionConfig
from neox.errors import ConfigError
from neox.train.precision import LossScaler, Precision


def scaler(**kw):
    return LossScaler(
        PrecisionConfig(
            precision="fp16",
            **{"initial_scale_power": 4, "loss_scale_window": 3, "hysteresis": 2, "min_loss_scale": 2.0, **kw},
        )
    )


def test_overflow_halves_only_after_hysteresis():
    s = scaler()
    assert s.scale == 16.0
    s.update(True)  # first overflow spends the hysteresis budget
    assert s.scale == 16.0
    s.update(True)  # second overflow halves
    assert s.scale == 8.0
    s.update(True)  # budget stays spent: every further overflow halves
    assert s.scale == 4.0
    s.update(True)
    s.update(True)
    assert s.scale == 2.0  # floor: min_loss_scale


def test_growth_after_window_of_clean_steps_refills_hysteresis():
    s = scaler(hysteresis=1)
    s.update(True)  # iteration 0 overflows -> 8
    assert s.scale == 8.0
    s.update(False)
    s.update(False)
    assert s.scale == 8.0
    s.update(False)  # third clean iteration after the overflow -> double
    assert s.scale == 16.0
    for _ in range(3):
        s.update(False)
    assert s.scale == 32.0


def test_growth_from_start_waits_a_full_window():
    s = scaler()
    for _ in range(2):
        s.update(False)
    assert s.scale == 16.0
    s.update(False)
    assert s.scale == 32.0 and s.hysteresis_left == 2


def test_static_scale_never_changes_and_state_round_trips():
    s = scaler(loss_scale=128.0)
    assert not s.dynamic
    s.update(True)
    s.update(True)
    assert s.scale == 128.0
    d = scaler()
    d.update(True)
    e = scaler()
    e.load_state_dict(d.state_dict())
    assert e.state_dict() == d.state_dict()


def test_precision_modes():
    model = torch.nn.Linear(4, 4)
    p = Precision(PrecisionConfig(precision="bf16", bf16_mode="pure"))
    assert p.prepare(model).weight.dtype == torch.bfloat16 and not p.uses_autocast and p.scaler is None
    p = Precision(PrecisionConfig(precision="bf16"))
    with p.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert Precision(PrecisionConfig(precision="fp16")).scaler.scale == 2.0**16
    with pytest.raises(ConfigError, match="bf16_mode"):
        Precision(PrecisionConfig(precision="bf16", bf16_mode="half"))


@pytest.mark.parametrize("mode", ["autocast", "pure"])
def test_bf16_forward_uses_fp32_block_matmuls_on_cpus_without_bf16(mode, monkeypatch):
    from neox.kernels import bf16_cpu

    calls = []
    real = bf16_cpu.bf16_linear_fp32_blocks
    monkeypatch.setattr(bf16_cpu, "bf16_linear_fp32_blocks", lambda *a: calls.append(1) or real(*a))
    prec = Precision(PrecisionConfig(precision="bf16", bf16_mode=mode))
    lin = prec.prepare(torch.nn.Linear(16, 8))
    with prec.autocast():
        out = lin(torch.randn(4, 16).to(prec.param_dtype))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and lin.weight.grad is not None
    assert len(calls) == (1 if bf16_cpu.cpu_lacks_bf16() else 0)
    with Precision(PrecisionConfig(precision="fp32")).autocast():
        torch.nn.Linear(16, 8)(torch.randn(4, 16))
    assert len(calls) == (1 if bf16_cpu.cpu_lacks_bf16() else 0)  # fp32 never takes it


@pytest.fixture
def tf32_switches():
    """The process's TF32 switches (settable without a GPU), restored after the test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_set_for_cuda_runs_only(tf32_switches, precision, tf32):
    cfg = PrecisionConfig(precision=precision, tf32=tf32)
    for before in [(True, True), (False, False)]:  # a CPU run leaves whatever was set
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        Precision(cfg, "cpu")
        assert tf32_switches() == before
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (not tf32, not tf32)
    p = Precision(cfg, "cuda")
    assert tf32_switches() == (tf32, tf32)
    assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")  # the newer API agrees
    assert p.label() == {"fp32": "fp32+tf32" if tf32 else "fp32", "bf16": "bf16-autocast", "fp16": "fp16"}[precision]


def test_tf32_defaults_on():
    assert PrecisionConfig().tf32 is True
