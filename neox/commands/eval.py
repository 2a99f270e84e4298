"""`neox eval CHECKPOINT --tasks ...`: lm-evaluation-harness tasks on a checkpoint.

Tasks come from the harness registry (their data from the HF Hub, as the harness fetches it), from
--include-path YAMLs, or are the bundled local tasks (lambada_openai_local, piqa_local, wikitext2_local,
lambada_gen_local) that read the eval data folder `neox prepare lambada|piqa|wikitext2` fills.
With `--nproc N` the model runs tensor parallel over N processes under torchrun (neox.infer.tensor_parallel):
every rank runs the same requests in step, only rank 0 prints and writes the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

from neox.commands.common import check_positive
from neox.data.eval_sets import EVAL_DATA_ENV
from neox.errors import NeoxError, ensure_dir
from neox.infer.api import build_model_for, build_tokenizer_for, checkpoint_config
from neox.infer.tensor_parallel import check_inference_layout, init_inference, is_output_rank
from neox.interop.eval_tasks import local_task_dirs
from neox.interop.lm_eval import NeoxLM, results_table, run_tasks, write_results
from neox.kernels.device import resolve_device
from neox.parallel import launch
from neox.train.checkpoint import resolve


def register(parser, name):
    parser.add_argument("checkpoint", help="run directory (its latest checkpoint) or one checkpoint directory")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction below 1)")
    parser.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="directory of task YAMLs (repeatable)"
    )
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, help="context length (default: the model's)")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="eval data folder the local tasks read, as `neox prepare lambada|piqa|wikitext2` writes it "
        f"(default: ${EVAL_DATA_ENV} or ~/.cache/neox/eval-data)",
    )
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        help="bootstrap samples for the stderr of metrics without a closed form (default: the harness's; 0 = skip)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", metavar="DIR", help="write results.json and results.txt here")
    parser.add_argument("--log-samples", action="store_true", help="keep per-example outputs in results.json")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    launch.add_arguments(parser)  # --nproc N: the model tensor parallel over N processes
    parser.set_defaults(func=run)


def run(args) -> int:
    # flag checks come before the checkpoint is loaded, the output folder before the (long) evaluation
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise NeoxError(f"--tasks {args.tasks!r}: no task names; give comma-separated lm-eval task names")
    if args.limit is not None and args.limit <= 0:
        raise NeoxError(f"--limit {args.limit:g}: must be > 0 (a count, or a fraction below 1)")
    check_positive(batch_size=args.batch_size, max_length=args.max_length)
    for d in args.include_path:
        if not Path(d).is_dir():
            raise NeoxError(f"--include-path {d}: no such directory of task YAMLs")
    if args.bootstrap_iters is not None and args.bootstrap_iters < 0:
        raise NeoxError(f"--bootstrap-iters {args.bootstrap_iters}: must be >= 0 (0 skips the stderr)")
    local_task_dirs(tasks, args.data_dir)  # the local tasks' data is there
    if args.output:
        ensure_dir(args.output, "--output")
    ckpt = resolve(args.checkpoint)
    cfg = checkpoint_config(ckpt)
    source = str(args.checkpoint)
    code = launch.launch(args, sys.argv[1:], validate=lambda world: check_inference_layout(cfg, world, source))
    if code is not None:
        return code
    device = resolve_device(args.device)
    mesh = init_inference(cfg, device, source)
    tokenizer = build_tokenizer_for(cfg, ckpt)
    model = build_model_for(cfg, ckpt, device, args.dtype, mesh)
    lm = NeoxLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    results = run_tasks(
        lm,
        tasks,
        limit=limit,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
        log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters,
        data_dir=args.data_dir,
    )
    if not is_output_rank():
        return 0  # the other tensor-parallel ranks computed the same results
    print(results_table(results))
    if args.output:
        print(f"wrote {write_results(results, args.output)}", file=sys.stderr)
    return 0
