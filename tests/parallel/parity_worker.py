"""Run a tiny GPT for a few AdamW steps under several layouts in one torchrun launch; rank 0 writes the losses.

Usage (torchrun): parity_worker.py OUT.json CASES.json, CASES a list of {"name", "parallel": {...}, "model": {...}}.
Imported by the tests for the single-process reference (`run_case(case, micro_batches=DP)`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.parallel.dist_helpers

import torch

from neox.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
from neox.train.optim import build_optimizer
from tests.parallel.dist_helpers import strict_collectives

COLLECTIVES_KEY = "_checked_collectives"  # results entry: strict_collectives' counts on rank 0

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
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # low-precision cases: autocast over fp32 weights


def batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def loss_masks(step: int) -> torch.Tensor:
    """[GLOBAL_BATCH, SEQ] masks with a masked prefix of a different length in every row (0 to 12 of 16
    tokens), so data-parallel ranks (2 or 4 of them) hold different numbers of counted tokens at every step."""
    mask = torch.ones(GLOBAL_BATCH, SEQ)
    for row in range(GLOBAL_BATCH):
        mask[row, : (3 + 5 * row + 2 * step) % 13] = 0
    return mask


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The single-process loss written out: token cross entropy, mean over the tokens the mask keeps."""
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum()


def run_case(case: dict, mesh=None, micro_batches: int = 1) -> list[float]:
    """Losses of STEPS clipped AdamW steps. Under `mesh` each data-parallel rank takes its rows of the global
    batch and its own masked-mean loss (GPT-NeoX's per-micro-batch normalisation; gradients are averaged
    over ranks). One process (mesh None) is the reference: the global batch cut into `micro_batches` row
    blocks (one per data-parallel rank of the layout it stands for), each block's masked mean, the mean of
    those accumulated by hand."""
    from neox.model import GPT
    from neox.model.moe import set_aux_loss_scale
    from neox.parallel import apply, clip_grad_norm_, dp_rank_and_size, is_vocab_parallel, loss_context, mean_over
    from neox.parallel.reduce import masked_mean_loss

    mcfg = ModelConfig(**{**BASE_MODEL, **case.get("model", {})})
    pcfg = ParallelConfig(**case.get("parallel", {}))
    torch.manual_seed(1234)
    model = GPT(mcfg)
    precision = case.get("precision", "fp32")
    apply(model, pcfg, mesh, precision=precision)
    if "optimizer" in case:  # one of neox's optimizers, as the Trainer builds it (its groups, its kernels)
        opt = build_optimizer(model, OptimizerConfig(**case["optimizer"]), mcfg)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    blocks = [(dp_rank, dp_size)] if mesh is not None else [(i, micro_batches) for i in range(micro_batches)]
    # MoE aux losses are scaled as the token loss is: 1/blocks by hand in one process, averaged by the layout
    set_aux_loss_scale(model, 1.0 if mesh is not None else 1.0 / len(blocks))
    losses = []
    for step, data in enumerate(batches(mcfg.vocab_size)):
        masks = loss_masks(step)
        total = 0.0
        for index, count in blocks:
            rows = slice(index * GLOBAL_BATCH // count, (index + 1) * GLOBAL_BATCH // count)
            tokens, labels, mask = data[rows, :-1], data[rows, 1:], masks[rows]
            with torch.autocast("cpu", dtype=AUTOCAST.get(precision), enabled=precision in AUTOCAST):
                logits = model(tokens)
            if mesh is None:
                loss = reference_loss(logits, labels, mask)
                (loss / len(blocks)).backward()
            else:
                with loss_context(is_vocab_parallel(logits)):
                    loss = masked_mean_loss(logits, labels, mask)
                    loss.backward()
            total += float(loss.detach()) / len(blocks)
        clip_grad_norm_(model.parameters(), 0.05, mesh)  # small enough to clip every step
        opt.step()
        opt.zero_grad()
        losses.append(float(mean_over(total, mesh)))
    return losses


def main(out: str, cases_file: str) -> None:
    import torch.distributed as dist

    from neox.parallel.mesh import ParallelDims, build_mesh

    dist.init_process_group("gloo")
    seen = strict_collectives()
    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        pcfg = ParallelConfig(**case.get("parallel", {}))
        mcfg = ModelConfig(**{**BASE_MODEL, **case.get("model", {})})
        dims = ParallelDims.from_config(pcfg, dist.get_world_size(), mcfg)
        results[case["name"]] = run_case(case, build_mesh(dims))
    results[COLLECTIVES_KEY] = dict(seen)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
