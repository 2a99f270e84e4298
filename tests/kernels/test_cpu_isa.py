"""neox.kernels.cpu_isa: AMX as oneDNN sees it, the CPU's flags and the ONEDNN_MAX_CPU_ISA cap together."""

import pytest
import torch

from neox.kernels import cpu_isa


@pytest.fixture(autouse=True)
def no_cap(monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "cap, allowed",
    [
        (None, True),
        ("ALL", True),
        ("avx512_core_amx", True),
        ("AVX10_1_512_AMX_FP16", True),
        ("AVX2", False),
        ("AVX512_CORE_BF16", False),
    ],
)
def test_the_onednn_cap_decides_on_a_cpu_with_amx(monkeypatch, cap, allowed):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    if cap is not None:
        monkeypatch.setenv("DNNL_MAX_CPU_ISA" if cap == "ALL" else "ONEDNN_MAX_CPU_ISA", cap)
    assert cpu_isa.probe_amx(torch.bfloat16) is allowed


def test_no_amx_on_the_cpu_or_for_the_dtype(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    assert not cpu_isa.probe_amx(torch.bfloat16)
    assert not cpu_isa.probe_amx(torch.float16)
    assert not cpu_isa.probe_amx(torch.float32)  # fp32 GEMMs have no AMX
