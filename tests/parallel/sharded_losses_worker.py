"""The post-training losses on vocab-sharded logits (two ranks, gloo) against the same losses on the whole logits
in one process: each case's largest difference of the loss and of its gradient. Rank 0 writes them.

Usage (torchrun, 2 processes): sharded_losses_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.parallel.dist_helpers

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from neox.parallel.reduce import loss_context
from neox.train.distill import distillation_loss, vocab_topk
from neox.train.loss import masked_mean_loss
from neox.train.preference import reward_scores, sequence_logps
from tests.parallel.dist_helpers import strict_collectives

B, S, V = 3, 5, 16


def compare(fn, z, t, mesh) -> tuple[float, float]:
    """(|loss - sharded loss|, max |grad - sharded grad|) of fn(logits, teacher logits)."""
    plain = z.clone().requires_grad_(True)
    fn(plain, t).backward()
    sharded = distribute_tensor(z.clone(), mesh, [Shard(2)]).requires_grad_(True)
    with loss_context(True):
        loss = fn(sharded, distribute_tensor(t, mesh, [Shard(2)]))
        loss.backward()
    value = abs(fn(z, t).item() - loss.item())
    return value, (plain.grad - sharded.grad.full_tensor()).abs().max().item()


def main(out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    strict_collectives()
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    z, t = torch.randn(B, S, V), torch.randn(B, S, V)
    labels = torch.randint(0, V, (B, S))
    labels[0, :2] = -100
    mask = torch.ones(B, S)
    mask[1, 3] = 0
    weights = torch.tensor([1.0, -2.0, 3.0])
    values, index = t.topk(6, dim=-1)
    cases = {
        "lm loss": lambda a, b: masked_mean_loss(a, labels.clamp(min=0), mask),
        "sequence logps": lambda a, b: (sequence_logps(a, labels, mask) * weights).sum(),
        # token 1 on the first rank's half of the vocabulary, 12 on the second's
        "reward token 1": lambda a, b: (reward_scores(a, labels, 1) * weights).sum(),
        "reward token 12": lambda a, b: (reward_scores(a, labels, 12) * weights).sum(),
        # the top-k (values, indices) from a cache: global indices read from both ranks
        "distill cache top6": lambda a, b: distillation_loss(a, (values, index.int()), labels, mask, 0.5, 2.0, 6)[0],
    }
    for k in (0, 4, 12):  # the whole-vocabulary KL, a top-k inside one shard's width, one wider than a shard
        for alpha in (0.0, 1.0, 0.3):
            cases[f"distill top{k} alpha {alpha}"] = lambda a, b, k=k, alpha=alpha: distillation_loss(
                a, b, labels, mask, alpha, 2.0, k
            )[0]
    results = {name: compare(fn, z, t, mesh) for name, fn in cases.items()}
    # the sharded top-k is the whole vocabulary's (values and indices)
    got_v, got_i = vocab_topk(distribute_tensor(t.reshape(-1, V), mesh, [Shard(1)]), 12)
    want_v, want_i = t.reshape(-1, V).topk(12, dim=-1)
    results["topk indices equal"] = bool(torch.equal(got_i, want_i) and torch.equal(got_v, want_v))
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
