import pytest
import torch

from neox.errors import NeoxError
from neox.infer import generate as generate_module
from neox.infer.generate import cut_at_stop, generate
from neox.infer.sampling import SamplingParams
from tests.infer.tiny import greedy_reference, greedy_shortfall, random_model, tiny_config
from tests.syncs import count_syncs

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 1]]


@pytest.mark.parametrize("kv", [4, 2])
@pytest.mark.parametrize("pos_emb", ["rotary", "learned", "sinusoidal", "alibi", "rpe", "none"])
def test_cache_equals_recompute_and_batch_equals_single(pos_emb, kv):
    model = random_model(tiny_config(pos_emb=pos_emb, num_kv_heads=kv, rotary_pct=0.5), scale=0.3)
    cached = generate(model, PROMPTS, 6)
    assert cached.tokens == generate(model, PROMPTS, 6, recompute=True).tokens
    assert cached.tokens == [generate(model, [p], 6).tokens[0] for p in PROMPTS]
    assert all(len(t) == 6 for t in cached.tokens) and cached.finish_reasons == ["length"] * 3
    assert cached.tokens == [greedy_reference(model, p, 6) for p in PROMPTS]


def test_eod_ends_a_row_and_is_not_returned():
    model = random_model(tiny_config(), scale=0.3)
    free = generate(model, PROMPTS, 12).tokens
    assert free == [greedy_reference(model, p, 12) for p in PROMPTS]
    eod = free[0][4]
    first = free[0].index(eod)
    res = generate(model, PROMPTS, 12, eod_id=eod)
    assert res.tokens[0] == free[0][:first] and res.finish_reasons[0] == "eod"
    for row, full, reason in zip(res.tokens, free, res.finish_reasons):  # other rows are unaffected until they stop
        assert row == (full[: full.index(eod)] if eod in full else full)
        assert reason == ("eod" if eod in full else "length")


def test_stop_strings_cut_the_text():
    model = random_model(tiny_config(), scale=0.3)
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    free = generate(model, [PROMPTS[0]], 12).tokens[0]
    stop = f"<{free[3]}>"
    res = generate(model, [PROMPTS[0]], 12, stop_strings=[stop], decode=decode)
    upto = free.index(free[3])
    assert res.finish_reasons == ["stop"]
    assert res.texts[0] == decode(free[:upto])
    assert cut_at_stop("abcXdeY", ["Y", "X"]) == ("abc", True)


def test_repetition_penalty_prevents_repeats():
    model = random_model(tiny_config(), scale=0.3)
    plain = generate(model, [[7]], 30).tokens[0]
    assert len(set(plain)) < 30  # a random tiny model loops
    res = generate(model, [[7]], 30, SamplingParams(temperature=0, repetition_penalty=1e4)).tokens[0]
    assert len(set(res)) == 30 and 7 not in res
    assert plain == greedy_reference(model, [7], 30)
    assert res == greedy_reference(model, [7], 30, repetition_penalty=1e4)
    mild = SamplingParams(temperature=0, repetition_penalty=1.3)  # padded rows: the padding is never "seen"
    assert generate(model, PROMPTS, 12, mild).tokens == [
        greedy_reference(model, p, 12, repetition_penalty=1.3) for p in PROMPTS
    ]


def test_seed_reproducible_sampling():
    model = random_model(tiny_config(), scale=0.3)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    run = lambda s: generate(model, PROMPTS, 8, params, generator=torch.Generator().manual_seed(s)).tokens  # noqa
    assert run(1) == run(1) and run(1) != run(2)


def test_bf16_generation_runs_on_cache():
    model = random_model(tiny_config(num_kv_heads=2), scale=0.3).to(torch.bfloat16)
    res = generate(model, PROMPTS, 6)
    assert [len(t) for t in res.tokens] == [6, 6, 6]
    # the cache and the CPU bf16 matmul mode round differently from a full forward: a near-tie (two bf16 ulps)
    # may flip, a wrong token falls further behind
    assert max(greedy_shortfall(model, p, out, 6) for p, out in zip(PROMPTS, res.tokens)) <= 2**-7


def test_too_long_for_the_position_table():
    model = random_model(tiny_config(pos_emb="learned", seq_length=16))
    with pytest.raises(NeoxError, match="max_position_embeddings=16"):
        generate(model, [[1] * 10], 7)
    with pytest.raises(NeoxError, match="at least one token"):
        generate(model, [[]], 2)


def test_stop_checked_every_k_tokens_gives_the_same_output(monkeypatch):
    """On a GPU the loop asks whether every row has stopped only every few tokens (the read waits for the
    device): the steps past the stop are padding, cut from the output. A CPU asks every token."""
    model = random_model(tiny_config(), scale=0.3)
    free = generate(model, PROMPTS, 16).tokens
    eod = free[0][4]
    first = free[0].index(eod)
    batch_1, batch_3 = generate(model, PROMPTS[:1], 16, eod_id=eod), generate(model, PROMPTS, 16, eod_id=eod)
    assert batch_1.steps == first + 1  # CPU: stops the step its last row ends
    monkeypatch.setattr(generate_module, "stop_check_every", lambda device: 8)
    for before, prompts in ((batch_1, PROMPTS[:1]), (batch_3, PROMPTS)):
        after = generate(model, prompts, 16, eod_id=eod)
        assert (after.tokens, after.finish_reasons) == (before.tokens, before.finish_reasons)
    assert generate(model, PROMPTS[:1], 16, eod_id=eod).steps == 8


def test_decoding_reads_the_device_once_every_k_tokens(monkeypatch):
    """Host reads of the generation loop (tests/syncs.py), counted: with an EOD to watch for and no stop
    strings, 48 tokens read 4 more times than 16 at one check per 8 tokens; nothing else grows with the length.
    The model's own position check (a read a token) does not run: generate checked the range up front."""
    model = random_model(tiny_config(), scale=0.3)
    unused = next(i for i in range(384) if all(i not in row for row in generate(model, PROMPTS, 48).tokens))
    monkeypatch.setattr(generate_module, "stop_check_every", lambda device: 8)
    reads = {}
    for n in (16, 48):
        with count_syncs() as events:
            assert generate(model, PROMPTS, n, eod_id=unused).finish_reasons == ["length"] * 3
        reads[n] = list(events)
        assert not [e for e in events if e.startswith("neox/model/transformer.py")], events
    assert len(reads[48]) - len(reads[16]) == (48 - 16) // 8, reads
    assert len(reads[16]) <= 2 + len(PROMPTS) + 16 // 8, reads[16]  # setup, one read per row's output, checks
