"""`neox train CONFIG... [-d DIR] [--set KEY=VALUE]`: train or fine-tune from GPT-NeoX-style YAML configs.

With `--nproc N` (or a hostfile / Slurm step) the command re-launches itself under torchrun and every worker
trains its part of the layout in `parallel`; see neox.parallel.launch.
"""

from __future__ import annotations

import argparse
import functools
import sys

from neox.commands.common import add_config_args
from neox.config import load, resolve_batch
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError
from neox.infer.api import build_model_for, build_tokenizer_for, checkpoint_config
from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from neox.interop.lm_eval import evaluate_model
from neox.kernels.device import resolve_device
from neox.parallel import launch, pipeline
from neox.parallel.mesh import ParallelDims
from neox.parallel.worker_status import EXIT_HANG, EXIT_PREEMPTED
from neox.train import preempt
from neox.train.checkpoint import check_run_dirs, resolve
from neox.train.distributed import make_layout, resume_config
from neox.train.preference import score_completions
from neox.train.trainer import TaskEvaluator, Trainer
from neox.train.watchdog import collective_timeout, is_collective_timeout

EXIT_CODES = (
    f"exit codes: 0 trained to train_iters; 2 a user error (one line); {EXIT_PREEMPTED} stopped by SIGTERM, SIGINT, "
    "SIGUSR1 or train.max_runtime with a checkpoint saved (run the same command to resume); "
    f"{EXIT_HANG} a hang (train.hang_timeout) or a collective timeout; 128+N a second stop signal N (exited at "
    "once, nothing saved)"
)


def register(parser: argparse.ArgumentParser, name: str) -> None:
    parser.epilog = EXIT_CODES
    add_config_args(parser)
    launch.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    cfg = load(args.configs, args.overrides, config_dir=args.config_dir, training=True)
    source = ", ".join(args.configs)
    c = cfg.checkpoint
    # here, before torchrun starts N workers that would each refuse; a restarted worker resumes its own save
    check_run_dirs(c.save, launch.resume_dir(c.load, c.save), c.overwrite)
    code = launch.launch(
        args,
        sys.argv[1:],
        validate=lambda world: check_layout(cfg, world, source),
        grace_s=cfg.parallel.dist_timeout_minutes * 60,  # a stopping step and save; the watchdog ends a stuck one
    )
    if code is not None:
        return code
    cfg = resume_config(cfg)
    layout = make_layout(cfg, source)
    trainer = Trainer(cfg, layout=layout, evaluate_tasks=task_evaluator(cfg), **reinforce_functions(cfg, layout.mesh))
    try:
        summary = trainer.fit()
    except RuntimeError as e:
        if is_collective_timeout(e):  # one line naming this rank and the pending step, then EXIT_HANG
            collective_timeout(e, trainer.stopper.watchdog, cfg.parallel.dist_timeout_minutes)
        raise
    if summary.get("stopped"):
        return preempt.exit_code(summary["stopped"])  # EXIT_PREEMPTED: the same command resumes
    if not trainer.quiet:
        parts = [f"{k} {v:.4f}" for k, v in summary.items() if k.endswith(("loss", "ppl"))]
        print(f"done: iteration {trainer.iteration}" + (" | " + " | ".join(parts) if parts else ""))
    return 0


def reinforce_functions(cfg, mesh=None) -> dict:
    """train_impl reinforce: the sampler (neox.infer.generate) and the reward (train.reinforce_reward_model, a
    reward model scoring the decoded prompt and completion) the trainer takes; nothing otherwise. `mesh`: the
    run's (neox.train.distributed.make_layout), over whose tensor-parallel ranks the reward model is sharded."""
    t = cfg.train
    if t.train_impl != "reinforce":
        return {}
    device = resolve_device(t.device, "train.device")
    tokenizer = build_tokenizer(cfg.tokenizer)
    eod = tokenizer.eod_id
    reward_model, reward_cfg, reward_tokenizer = reward_model_for(t.reinforce_reward_model, device, mesh)

    def sampler(model, prompts, max_new_tokens, temperature):
        out = generate(model, prompts, max_new_tokens, SamplingParams(temperature=temperature), eod_id=eod)
        return [y + [eod] if why == "eod" else y for y, why in zip(out.tokens, out.finish_reasons)]

    def reward_fn(prompts, completions):
        pieces = [
            (tokenizer.decode(p), tokenizer.decode([i for i in y if i != eod])) for p, y in zip(prompts, completions)
        ]
        return score_completions(reward_model, reward_tokenizer, pieces, reward_cfg.model.seq_length, device)

    return {"sampler": sampler, "reward_fn": reward_fn}


def reward_model_for(path: str, device, mesh=None) -> tuple:
    """(model, config, tokenizer) of a train_impl: rm checkpoint, in eval mode: sharded over the mesh's
    tensor-parallel ranks as the policy is (each rank reads its slices), whole on every data-parallel rank. Every
    tensor-parallel rank scores the same completions (the sampler gives them rank 0's tokens)."""
    ckpt = resolve(path)
    rcfg = checkpoint_config(ckpt)
    tp = mesh["tp"].size() if mesh is not None else 1
    if tp > 1:
        m = rcfg.model
        for name in ("num_attention_heads", "num_kv_heads", "vocab_size"):
            value = getattr(m, name) or m.num_attention_heads
            if value % tp:
                raise ConfigError(
                    f"train.reinforce_reward_model: {ckpt} has {name} {value}, which tensor-parallel size {tp} "
                    "(parallel.model_parallel_size) does not divide; the reward model is sharded as the policy"
                )
    model = build_model_for(rcfg, ckpt, device, mesh=mesh if tp > 1 else None)
    return model, rcfg, build_tokenizer_for(rcfg, ckpt)


def task_evaluator(cfg) -> TaskEvaluator | None:
    """lm-eval's scores of `eval.eval_tasks` for the trainer (None when no tasks are set)."""
    e = cfg.eval
    if not e.eval_tasks:
        return None
    return functools.partial(
        evaluate_model,
        tasks=list(e.eval_tasks),
        limit=e.eval_tasks_limit,
        include_path=e.eval_include_path,
        max_length=cfg.model.seq_length,
    )


def check_layout(cfg, world_size: int, source: str) -> None:
    """Everything about the parallel layout that can be wrong, for `world_size` processes, before any starts:
    the mesh, the batch triple at that data-parallel size, and the pipeline schedule's constraints (which
    would otherwise fail on every rank at Trainer start)."""
    dims = ParallelDims.from_config(cfg.parallel, world_size, cfg.model, source)
    accum = resolve_batch(cfg, dims.dp)[1]
    if cfg.parallel.pipe_parallel_size > 1:
        pipeline.validate(cfg.parallel, cfg.model.num_layers, accum, source)
