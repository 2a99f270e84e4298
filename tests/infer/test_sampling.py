import pytest
import torch

from neox.errors import ConfigError
from neox.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    choose_next,
    process_logits,
)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert choose_next(logits, SamplingParams(temperature=0)).tolist() == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ties_take_the_first_maximum_as_argmax_does(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (64, 50304), generator=g).to(dtype)  # many ties per row, across SIMD lanes
    logits[3, 7] = logits[3, 50000] = 9.0  # a tie far apart
    chosen = choose_next(logits, SamplingParams(temperature=0))
    assert torch.equal(chosen, logits.float().argmax(dim=-1)) and chosen[3] == 7


def test_top_k_keeps_k_largest():
    out = apply_top_k(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    assert torch.isinf(out).tolist() == [[True, False, False, True]]


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = lambda p: (~torch.isinf(apply_top_p(logits, p))).sum().item()  # noqa: E731
    assert kept(0.5) == 1  # the first token alone reaches 0.5
    assert kept(0.6) == 2
    assert kept(0.85) == 3
    # order of the vocabulary does not matter
    shuffled = logits[:, [2, 0, 1]]
    assert torch.isinf(apply_top_p(shuffled, 0.6)).tolist() == [[True, False, False]]


def test_repetition_penalty_only_on_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_temperature_scales_before_filters():
    logits = torch.tensor([[2.0, 1.0]])
    out = process_logits(logits, SamplingParams(temperature=0.5))
    assert out.tolist() == [[4.0, 2.0]]


def test_seeded_sampling_is_reproducible_and_follows_distribution():
    logits = torch.tensor([[0.0, 0.0, -20.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=1.0)
    a = choose_next(logits, params, generator=torch.Generator().manual_seed(3))
    b = choose_next(logits, params, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    counts = torch.bincount(a, minlength=3)
    assert counts[2] == 0 and abs(counts[0].item() - 2000) < 200


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=1.5), dict(repetition_penalty=0)])
def test_invalid_params_name_the_key(kw):
    with pytest.raises(ConfigError, match=f"generation.{next(iter(kw))}"):
        SamplingParams(**kw)
