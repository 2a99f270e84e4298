"""4-bit block-wise storage (neox.kernels.nf4): the NF4 code against the normal-quantile formula and the
paper's table, round trips within half a code step, the storage size, and bitsandbytes' bytes."""

from statistics import NormalDist

import pytest
import torch

from neox.kernels import nf4
from neox.kernels.bnb import load_bitsandbytes

# Appendix E of the QLoRA paper (as bitsandbytes prints it)
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_code_is_the_normal_quantiles():
    # q_i = Phi^-1(p_i) with p_i evenly spaced from delta = (1 - 1/30 + 1 - 1/32) / 2 down to 1/2,
    # 8 values for the positive half and 7 for the negative one, each half divided by its largest
    delta = (2 - 1 / 30 - 1 / 32) / 2
    phi_inv = NormalDist().inv_cdf
    pos = [phi_inv(delta - (delta - 0.5) * i / 8) / phi_inv(delta) for i in range(8)]
    neg = [-phi_inv(delta - (delta - 0.5) * i / 7) / phi_inv(delta) for i in range(7)]
    want = sorted([*pos, 0.0, *neg])
    got = nf4.nf4_code()
    assert len(got) == 16 and got == sorted(got)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-12
    assert max(abs(a - b) for a, b in zip(got, PAPER_NF4)) < 1e-6


def test_fp4_code_is_e2m1_over_six():
    mags = sorted({abs(v) * 6 for v in nf4.fp4_code()})
    assert mags == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("kind", nf4.KINDS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_is_within_half_a_code_step(kind, double_quant):
    w = torch.randn(77, 131, generator=torch.Generator().manual_seed(0)) * 0.02  # not whole blocks
    p = nf4.quantize(w, kind, double_quant)
    back = nf4.dequantize(p, w.shape, kind, torch.float32)
    code = torch.tensor(nf4.CODES[kind]())
    half_step = (code[1:] - code[:-1]).max().item() / 2
    blocks = nf4._blocks(w, nf4.BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    err = nf4._blocks(back - w, nf4.BLOCK).abs()
    if not double_quant:
        # each value lands on the nearest code point of its block's grid: at most half the widest gap
        assert (err <= half_step * absmax * (1 + 1e-6)).all()
        # and no other code point is nearer (plain loop over one block as the reference)
        scaled = (blocks[3] / absmax[3]).tolist()
        want = [min(code.tolist(), key=lambda c, v=v: abs(c - v)) * absmax[3].item() for v in scaled]
        assert torch.allclose(nf4._blocks(back, nf4.BLOCK)[3], torch.tensor(want), atol=1e-9)
    else:
        # the block maxima are off by at most half an int8 step of their 256-block's centred range
        maxima = nf4.block_maxima(p)
        centred = absmax.squeeze(1) - absmax.mean()
        assert (maxima - absmax.squeeze(1)).abs().max() <= centred.abs().max() / 127 / 2 * 1.001
        assert (err <= (half_step + 0.05) * absmax).all()
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < (0.11 if kind == "nf4" else 0.14), rel


@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_is_half_a_byte_per_weight_plus_scales(double_quant):
    w = torch.randn(512, 1024)
    p = nf4.quantize(w, "nf4", double_quant)
    n = w.numel()
    assert p.data.dtype == torch.uint8 and p.data.numel() == n // 2
    scales = (n // 64) * (1 if double_quant else 4) + (4 * (-(-n // 64 // 256)) + 4 if double_quant else 0)
    assert nf4.nbytes(p) == n // 2 + scales
    assert nf4.nbytes(p) / n == pytest.approx(0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64), abs=1e-5)


def test_zero_and_constant_blocks():
    w = torch.zeros(3, 64)
    w[1] = 0.5
    back = nf4.dequantize(nf4.quantize(w), w.shape, "nf4", torch.float32)
    assert torch.equal(back, w)  # 0 and +-1 are code values: exact


def test_dequantizes_into_the_asked_dtype():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    p = nf4.quantize(w)
    assert nf4.dequantize(p, w.shape, "nf4", torch.bfloat16).dtype == torch.bfloat16


def test_bytes_match_bitsandbytes():
    bnb = load_bitsandbytes()
    if bnb is None:
        pytest.skip("bitsandbytes is not installed")
    w = torch.randn(96, 130, generator=torch.Generator().manual_seed(1))
    p = nf4.quantize(w, "nf4")
    q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.reshape(-1), p.data) and torch.equal(state.absmax, p.absmax)
    run = nf4.bnb_dequantizer(bnb, w.device)
    assert run is not None
    assert torch.allclose(run(p, w.shape, torch.float32), nf4.dequantize(p, w.shape, "nf4", torch.float32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_dequantize_matches_cpu():
    w = torch.randn(256, 320)
    p = nf4.quantize(w.cuda(), "nf4", double_quant=True)
    ref = nf4.quantize(w, "nf4", double_quant=True)
    assert torch.equal(p.data.cpu(), ref.data)
    got = nf4.dequantize(p, w.shape, "nf4", torch.float32).cpu()
    assert torch.allclose(got, nf4.dequantize(ref, w.shape, "nf4", torch.float32))
    run = nf4.bnb_dequantizer(load_bitsandbytes(), torch.device("cuda"))
    if run is not None:
        assert torch.allclose(run(p, w.shape, torch.float32).cpu(), got)
