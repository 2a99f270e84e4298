"""`neox checkpoint consolidate CKPT OUT.pt`: a sharded (DCP) checkpoint -> one torch.save file of its weights and
config."""

from __future__ import annotations

from neox.kernels.device import torch_dtype
from neox.train.checkpoint import consolidate


def register(parser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("consolidate", help="write a sharded checkpoint's model weights as one state-dict file")
    c.add_argument("checkpoint", help="run directory (its latest checkpoint) or one iter_XXXXXXX directory")
    c.add_argument(
        "out",
        help='output file, e.g. model.pt: {"config": ..., "model": state dict} (docs/parallelism.md shows how to load it)',
    )
    c.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="cast floating-point weights (default: as saved)",
    )
    c.set_defaults(func=run_consolidate)


def run_consolidate(args) -> int:
    ckpt = consolidate(args.checkpoint, args.out, torch_dtype(args.dtype, "--dtype"))
    print(f"wrote {args.out} from {ckpt}")
    return 0
