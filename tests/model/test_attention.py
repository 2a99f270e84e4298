"""Attention layout and masks: GQA vs repeated-kv MHA, and segment masks vs separate documents."""

import pytest
import torch

from neox.config.schema import POS_EMBS, ModelConfig
from neox.model import GPT

V = 61


def build(**kw):
    torch.manual_seed(0)
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=V, seq_length=16)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def gqa_to_mha(weight, n_kv, group, head_dim):
    """Fused rows [n_kv, (q_0..q_{g-1}, k, v)] -> per-head [q, k, v] with each group's k/v repeated."""
    w = weight.view(n_kv, group + 2, head_dim, *weight.shape[1:])
    q, k, v = w[:, :group], w[:, group : group + 1], w[:, group + 1 :]
    per_head = torch.cat([q.unsqueeze(2), k.expand_as(q).unsqueeze(2), v.expand_as(q).unsqueeze(2)], dim=2)
    return per_head.reshape(n_kv * group * 3 * head_dim, *weight.shape[1:])


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_gqa_equals_mha_with_repeated_kv(pos_emb):
    gqa = build(num_kv_heads=2, pos_emb=pos_emb)
    mha = build(num_kv_heads=4, pos_emb=pos_emb)
    state = gqa.state_dict()
    for name in list(state):
        if "query_key_value" in name:
            state[name] = gqa_to_mha(state[name], n_kv=2, group=2, head_dim=8)
    mha.load_state_dict(state)
    x = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)
    assert gqa.layers["0"].attention.query_key_value.weight.shape == (2 * 4 * 8, 32)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_segments_equal_separate_documents(pos_emb):
    model = build(pos_emb=pos_emb, num_kv_heads=2)
    lengths = [5, 4, 3]
    x = torch.randint(0, V, (1, sum(lengths)))
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(x, positions, segment_ids=segments)
    separate = torch.cat([model(doc) for doc in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_causality_prefix_logits_do_not_see_the_future():
    model = build(pos_emb="rpe")
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, V, (2, 5))
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
