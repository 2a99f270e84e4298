"""Run a tiny GPT for a few AdamW steps under several layouts in one torchrun launch; rank 0 writes the losses.

Usage (torchrun): parity_worker.py OUT.json CASES.json, CASES a list of {"name", "parallel": {...}, "model": {...}}.
Imported by the tests for the single-process reference (`run_case(case, mesh=None)`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from neox.config.schema import ModelConfig, ParallelConfig

STEPS, GLOBAL_BATCH, SEQ = 5, 4, 16
BASE_MODEL = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    seq_length=SEQ,
    vocab_size=128,
    intermediate_size=64,
)


def batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def run_case(case: dict, mesh=None, dims=None) -> list[float]:
    from neox.model import GPT
    from neox.parallel import apply, clip_grad_norm_, dp_rank_and_size, loss_context, mean_over
    from neox.parallel.reduce import masked_mean_loss

    mcfg = ModelConfig(**{**BASE_MODEL, **case.get("model", {})})
    pcfg = ParallelConfig(**case.get("parallel", {}))
    torch.manual_seed(1234)
    model = GPT(mcfg)
    precision = case.get("precision", "fp32")
    apply(model, pcfg, mesh, precision=precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    micro = GLOBAL_BATCH // dp_size
    losses = []
    for step, data in enumerate(batches(mcfg.vocab_size)):
        mine = data[dp_rank * micro : (dp_rank + 1) * micro]
        tokens, labels = mine[:, :-1], mine[:, 1:]
        mask = torch.ones_like(labels)
        mask[:, : step % 3] = 0  # a masked prefix: the loss normalisation must match too
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens)
        from neox.parallel import is_vocab_parallel

        with loss_context(is_vocab_parallel(logits)):
            loss = masked_mean_loss(logits, labels, mask)
            loss.backward()
        clip_grad_norm_(model.parameters(), 0.05, mesh)  # small enough to clip every step
        opt.step()
        opt.zero_grad()
        losses.append(float(mean_over(loss.detach(), mesh)))
    return losses


def main(out: str, cases_file: str) -> None:
    import torch.distributed as dist

    from neox.parallel.mesh import ParallelDims, build_mesh

    dist.init_process_group("gloo")
    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        pcfg = ParallelConfig(**case.get("parallel", {}))
        mcfg = ModelConfig(**{**BASE_MODEL, **case.get("model", {})})
        dims = ParallelDims.from_config(pcfg, dist.get_world_size(), mcfg)
        results[case["name"]] = run_case(case, build_mesh(dims))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
