"""`neox export hf CHECKPOINT OUT` and `neox import hf MODEL_DIR OUT` (one module registers both names)."""

from __future__ import annotations

import sys

from neox.interop.hf import export_checkpoint, import_hf


def register(parser, name):
    parser.add_argument("format", choices=["hf"], help="hf: Hugging Face transformers (GPTNeoX / Llama)")
    if name == "export":
        parser.add_argument("checkpoint", help="run directory (its latest checkpoint) or one checkpoint directory")
        parser.add_argument("out", help="directory to write config.json, model.safetensors and tokenizer files to")
        parser.add_argument(
            "--dtype",
            choices=["float32", "bfloat16", "float16"],
            help="cast the exported weights (default: as trained)",
        )
        parser.add_argument("--no-tokenizer", action="store_true", help="export the weights and config only")
        parser.add_argument(
            "--max-shard-size",
            default="50GB",
            help="largest weight file (e.g. 2GB, 500MB); bigger models are written as "
            "model-0000k-of-0000n.safetensors + model.safetensors.index.json "
            "(default 50GB, transformers' default)",
        )
        parser.set_defaults(func=run_export)
    else:
        parser.add_argument("model_dir", help="local GPTNeoXForCausalLM or LlamaForCausalLM directory")
        parser.add_argument("out", help="run directory to write (latest, iter_0000000/, neox.yml)")
        parser.add_argument(
            "--eod-token",
            help="end-of-document token (default: the eos token the directory's "
            "tokenizer_config.json / special_tokens_map.json / config.json declares)",
        )
        parser.add_argument("--pad-token", help="padding token (default: the pad token the directory declares)")
        parser.set_defaults(func=run_import)


def run_export(args) -> int:
    out = export_checkpoint(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        with_tokenizer=not args.no_tokenizer,
        max_shard_size=args.max_shard_size,
    )
    print(f"exported {args.checkpoint} to {out}", file=sys.stderr)
    return 0


def run_import(args) -> int:
    out = import_hf(args.model_dir, args.out, eod_token=args.eod_token, pad_token=args.pad_token)
    print(f"imported {args.model_dir} to {out} (config: {out / 'neox.yml'})", file=sys.stderr)
    return 0
