"""torchrun worker for tests/train/test_build.py: build models through neox.train.build under parallel layouts.

Usage: build_worker.py SPEC.json OUT_DIR. SPEC = {"block_elements": N or null, "cases": [{"name", "config"}],
"memory": bool}. For each case every rank writes OUT_DIR/NAME.rankR.pt: {"params": the full tensors (DTensor
shards gathered over their meshes) of the parameters this rank holds, "eval_loss": the runner's loss on
`eval_batch`}. With "memory", each rank writes
OUT_DIR/NAME.rankR.json instead: its RSS growth during the build and the model's full fp32 size.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.*

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from neox.config import from_dict
from neox.model import info
from neox.model import init as model_init
from neox.train.build import build_model
from neox.train.distributed import make_layout
from neox.train.loss import masked_mean_loss
from neox.train.precision import Precision
from tests.parallel.dist_helpers import strict_collectives


def rss_bytes() -> int:
    """Resident set size now (ru_maxrss is the peak so far)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build(cfg):
    layout = make_layout(cfg)
    precision = Precision(cfg.precision, "cpu")
    return build_model(cfg, layout, precision, torch.device("cpu"), accum=2, loss_fn=masked_mean_loss)


def eval_batch(vocab: int, seq: int) -> dict:
    """One sequence, the same on every rank (so every data-parallel rank's loss is the whole loss)."""
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq)}


def full_state(model) -> dict:
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def main(spec_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    if spec.get("block_elements"):
        model_init.BLOCK_ELEMENTS = spec["block_elements"]  # small blocks: shards straddle block edges
    strict_collectives()
    out = Path(out_dir)
    for case in spec["cases"]:
        cfg = from_dict(case["config"], source="<test>")
        if spec.get("memory"):
            before = rss_bytes()
            model, _ = build(cfg)
            grown = peak_rss_bytes() - before
            record = {"grown": grown, "full_fp32": 4 * info.num_params(cfg.model)}
            record["local"] = sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters()
            )
            (out / f"{case['name']}.rank{dist.get_rank()}.json").write_text(json.dumps(record))
        else:
            model, runner = build(cfg)
            loss = float(runner.eval_loss(eval_batch(cfg.model.vocab_size, cfg.model.seq_length)))
            state = {"params": full_state(model), "eval_loss": loss}
            torch.save(state, out / f"{case['name']}.rank{dist.get_rank()}.pt")
        del model
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
