"""DPO / KTO sequence log-probabilities, reward-model scores and the distillation loss (whole-vocabulary KL, live
and cached top-k) on vocab-sharded logits over two ranks equal the same functions on the whole logits, loss and
gradient. The distillation KL is the case loss_parallel's own log_softmax gets wrong: its backward passes the
gradient through unchanged, right only before nll_loss (with it the distillation gradients here were off by 0.02
to 0.04; neox.parallel.reduce.shard_log_softmax replaces it)."""

from __future__ import annotations

import json

import pytest

from tests.parallel.dist_helpers import torchrun


@pytest.mark.slow
def test_post_training_losses_on_sharded_logits_equal_the_whole_vocabulary(tmp_path):
    out = tmp_path / "out.json"
    torchrun("sharded_losses_worker.py", 2, str(out))
    got = json.loads(out.read_text())
    assert got.pop("topk indices equal") is True
    assert len(got) == 14
    for name, (value, grad) in got.items():
        assert value < 1e-5 and grad < 1e-6, (name, value, grad)
