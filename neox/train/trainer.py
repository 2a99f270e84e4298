"""The training loop: one loop for pretraining and fine-tuning.

Per optimizer step: `accum` micro-batches through `StepRunner.forward_backward` (loss = mean over
micro-batches of each one's masked-mean token loss, GPT-NeoX's normalisation), unscale and overflow check
(fp16), clip, optimizer step, then logging, evaluation and checkpointing on their intervals.

What changes under parallelism is confined to three places, all from `neox.parallel`: `Layout` (where this
process sits in the mesh), the `StepRunner` that `neox.parallel.parallelize` returns with the model (how
micro-batches run: gradient sync, tensor-parallel loss, pipeline schedules) and the mesh-aware reductions of
`neox.parallel.reduce` (loss, gradient norm and clipping, metric averaging). lm-eval tasks during training
(`eval.eval_tasks`) run through the `evaluate_tasks` callable the command layer passes in.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neox.config import resolve_batch, resolve_vocab, to_dict
from neox.config.schema import Config
from neox.config.validate import parse_duration
from neox.data.datasets import build_datasets, num_samples_for
from neox.data.loader import batches
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError, DataError, NeoxError, ensure_dir
from neox.kernels.device import resolve_device
from neox.kernels.host_memory import keep_freed_memory
from neox.model import flops_per_token, num_params
from neox.model.lora import is_adapter_key
from neox.parallel.dcp import AsyncSaver
from neox.parallel.reduce import clip_grad_norm_, mean_over, scale_grads_
from neox.train import checkpoint as ckpt
from neox.train import routing_stats
from neox.train.adapters import adapter_tensors, quantize_base, stores_4bit, write_adapter_files
from neox.train.build import build_model
from neox.train.curriculum import Curriculum, truncate
from neox.train.diagnostics import Diagnostics
from neox.train.distill import Distiller
from neox.train.guards import POLICY_KEYS, Event, Guards, GuardStop, documents_of, event_record, fused_optimizer
from neox.train.loss import masked_mean_loss
from neox.train.metrics import (
    METRICS_FILE,
    Console,
    Metrics,
    format_record,
    measure_peak_flops,
    peak_memory_bytes,
)
from neox.train.objectives import build_objective, prepare_reference
from neox.train.optim import build_optimizer
from neox.train.precision import Precision
from neox.train.preempt import Stopper
from neox.train.profiling import StepProfiler
from neox.train.schedule import LRSchedule

# (model, tokenizer) -> {"task/metric": score}: lm-eval tasks on the in-memory model
TaskEvaluator = Callable[[torch.nn.Module, object], dict]


@dataclass
class Layout:
    """Where this process sits. The default is one process; distributed runs fill it from the mesh."""

    mesh: object = None
    dp_rank: int = 0
    dp_size: int = 1
    world_size: int = 1
    is_logging_rank: bool = True


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@dataclass
class _Window:
    """The steps since the last log line. Their losses and gradient norms stay where they were computed until
    the log line reads them all at once: a step that does not log waits for nothing on the device."""

    start: float = 0.0  # perf_counter when the window's first step began (its data loading included)
    losses: list = field(default_factory=list)  # per step: this rank's loss, a 0-d tensor on the device
    norms: list = field(default_factory=list)  # per step: the global gradient norm, likewise
    skipped: list = field(default_factory=list)  # per step: skipped for fp16 overflow (not in the means)
    verdicts: list = field(default_factory=list)  # per step: the guards' [code, zscore, loss, norm], on the device
    read_verdicts: list = field(default_factory=list)  # the same as floats, for the steps read so far
    handled: int = 0  # steps whose guard events were acted on
    tokens: int = 0  # tokens trained on (a sequence-length curriculum shortens the samples)

    @property
    def steps(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, norm: torch.Tensor, skipped: bool, verdict: torch.Tensor) -> None:
        self.losses.append(loss.detach().float())
        self.norms.append(norm.detach().float())
        self.skipped.append(skipped)
        self.verdicts.append(verdict)

    def guarded(self, i: int) -> bool:
        """Whether the guards rejected step i (read first)."""
        return self.read_verdicts[i][0] > 0

    def read_guards(self) -> None:
        """The verdicts not read yet, in one host read (before a checkpoint that does not follow a log line)."""
        if len(self.read_verdicts) < self.steps:
            self.read_verdicts += torch.stack(self.verdicts[len(self.read_verdicts) :]).tolist()

    def read(self, mesh) -> tuple[list[float], list[float]]:
        """Per step, the loss averaged over data-parallel ranks and the gradient norm, as floats: one
        all-reduce and one host read for the whole window (they wait for its steps to finish)."""
        losses = mean_over(torch.stack(self.losses), mesh)
        verdicts = torch.stack(self.verdicts).to(losses.device)
        rows = torch.cat([torch.stack([losses, torch.stack(self.norms).to(losses.device)]), verdicts.T])
        loss_values, norm_values, *verdict_rows = rows.tolist()
        self.read_verdicts = [list(v) for v in zip(*verdict_rows)]
        return loss_values, norm_values


class Trainer:
    """Build everything from a Config, then `fit()`. See the module docstring for the step.

    `layout` is where this process sits (neox.train.distributed.make_layout for a torchrun worker; the
    default is one process); the model is parallelized for its mesh by `neox.parallel.parallelize` after
    precision casting and activation checkpointing, before the optimizer sees the parameters.
    `evaluate_tasks(model, tokenizer) -> {"task/metric": float}` scores `eval.eval_tasks` (lm-eval) on the
    current weights; it is needed only when eval_tasks is set.
    """

    def __init__(
        self,
        cfg: Config,
        layout: Layout | None = None,
        quiet: bool = False,
        evaluate_tasks: TaskEvaluator | None = None,
        sampler=None,
        reward_fn=None,
    ):
        self.cfg = cfg = copy.deepcopy(cfg)  # resolved values are written into this copy (and checkpoints)
        self.layout = layout or Layout()
        self.quiet = quiet or not self.layout.is_logging_rank
        self.device = resolve_device(cfg.train.device, "train.device")
        self._use_device(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # each step's temporaries reuse the last step's memory (neox.kernels.host_memory)
        if cfg.eval.eval_tasks and evaluate_tasks is None:
            raise ConfigError(
                "eval.eval_tasks is set but the Trainer was given no evaluate_tasks callable "
                "(neox train passes neox.interop.lm_eval's); pass one or clear eval.eval_tasks"
            )
        self.evaluate_tasks = evaluate_tasks
        c = cfg.checkpoint
        ckpt.check_run_dirs(c.save, c.load, c.overwrite)  # before the model is built: a refusal costs nothing
        self._seed(cfg.train.seed)

        self.tokenizer = build_tokenizer(cfg.tokenizer)
        resolve_vocab(cfg, self.tokenizer.vocab_size, tp=cfg.parallel.model_parallel_size)
        # resolved once per run: the data loader, the runner (pipeline micro-batches) and checkpoints use these
        self.micro, self.accum, self.global_batch = resolve_batch(cfg, self.layout.dp_size)
        tr = cfg.train
        tr.train_micro_batch_size_per_gpu, tr.gradient_accumulation_steps, tr.train_batch_size = (
            self.micro,
            self.accum,
            self.global_batch,
        )
        self.seq_length = cfg.model.seq_length
        self.train_iters = tr.train_iters
        if self.train_iters < 0:
            raise ConfigError(f"train.train_iters must be >= 0, got {self.train_iters}")

        self.precision = Precision(cfg.precision, self.device.type)
        self.objective = build_objective(
            tr, sampler, reward_fn
        )  # train_impl: its loss, data and reference; None = language modelling
        self.distiller = None
        if tr.train_impl == "distill":  # language-modelling data and loop; the teacher enters through the loss
            self.objective = None
            self.distiller = Distiller(cfg, self.device, self.precision, self.layout.mesh)  # teacher: student's tp
        loss_fn = self.objective or self.distiller or masked_mean_loss
        # built on the meta device, parallelized, then each rank's shard allocated and initialised
        self.model, self.runner = build_model(
            cfg, self.layout, self.precision, self.device, self.accum, loss_fn=loss_fn
        )
        self._seed(tr.seed + self.layout.dp_rank)  # a dropout stream per rank (the init is seeded per parameter)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.model)
        self.guards = Guards(tr, self.device, self.layout.world_size, fp16=self.precision.scaler is not None)
        self.schedule = LRSchedule(cfg.schedule, cfg.optimizer.lr, self.train_iters)
        self._build_data()
        self.curriculum = Curriculum(tr) if tr.curriculum_enabled else None
        self.diagnostics = Diagnostics(cfg, self.global_batch, self.layout.mesh) if Diagnostics.wanted(cfg) else None

        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self._step_tokens = self.global_batch * self.seq_length
        self.skipped_steps = 0
        self.losses: list[float] = []  # per optimizer step, this process's run only (filled at each log line)
        self.save_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
        run_dir = cfg.logging.log_dir or cfg.checkpoint.save
        self.run_dir = Path(run_dir) if run_dir else None
        # created now: an unwritable destination must fail before training, not at the first save
        for path, key in ((self.save_dir, "checkpoint.save"), (self.run_dir, "logging.log_dir")):
            if path is not None:
                ensure_dir(path, key)
        self._last_saved = None
        self.saver = AsyncSaver() if cfg.checkpoint.async_save and self.save_dir is not None else None
        self.stopper = self._build_stopper()  # creates a process group: the same point on every rank
        self.resumed = False
        if c.overwrite and self.save_dir is not None and not (c.load and ckpt.resumes(c.load, c.save)):
            self._clear_previous_run()
        if c.load:
            self._load(c.load)
        # QLoRA: the base to 4 bits once its values are final (a full-precision checkpoint's are loaded by now)
        quantize_base(self.model, cfg.lora, self.layout.world_size)
        if self.objective is not None:
            self._prepare_reference()

    # ---------------------------------------------------------------- setup helpers
    @staticmethod
    def _use_device(device: torch.device) -> None:
        """Make `device` the current GPU: the CUDA RNG state a checkpoint saves and restores, and the stream
        every kernel without an explicit device runs on, are the current device's (GPU 0 unless set)."""
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)

    @staticmethod
    def _seed(seed: int) -> None:
        # The data order does not depend on these (index files come from the seed alone).
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _prepare_reference(self) -> None:
        """The objective's reference (the starting weights), kept in the run directory so that a resumed run
        uses the first run's (neox.train.objectives)."""
        prepare_reference(
            self.objective,
            self.model,
            self.precision,
            self.device,
            self.tokenizer.eod_id,
            self.micro,
            self.run_dir,
            self.resumed,
            self.layout.is_logging_rank,
            runner=self.runner,
        )

    def _build_data(self) -> None:
        cfg = self.cfg
        if self.objective is not None:
            self.train_data, self.valid_data, self.test_data = self.objective.datasets(
                cfg.data, self.seq_length, cfg.train.seed
            )
            if self.train_data is None:
                raise DataError(
                    f"train_impl {cfg.train.train_impl}: no training data (see neox preprocess --preference)"
                )
            return
        samples = num_samples_for(self.train_iters, self.global_batch, cfg.eval.eval_interval, cfg.eval.eval_iters)
        self.train_data, self.valid_data, self.test_data = build_datasets(
            cfg.data,
            self.seq_length,
            cfg.train.seed,
            samples,
            return_segments=cfg.data.reset_attention_mask or cfg.data.reset_position_ids,
        )
        where = cfg.data.data_path or cfg.data.train_data_paths
        if self.train_data is None:
            raise DataError(
                f"data: the training split of {where} has no documents; check the dataset "
                "(neox data inspect PREFIX) and data.split"
            )

    def _clear_previous_run(self) -> None:
        """checkpoint.overwrite: the previous run's checkpoints and metrics go, so the directory holds one run."""
        gone = ckpt.clear_checkpoints(self.save_dir)
        if self.layout.is_logging_rank and self.run_dir is not None:
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        if gone:
            self._say(f"overwrite: removed {len(gone)} checkpoint(s) of the previous run in {self.save_dir}")

    def _build_stopper(self) -> Stopper:
        """Stop signals, train.max_runtime and the hang watchdog (neox.train.preempt, neox.train.watchdog)."""
        tr, p, world = self.cfg.train, self.cfg.parallel, self.layout.world_size
        return Stopper(
            parse_duration(tr.max_runtime),
            world,
            announce=not self.quiet,
            hang_timeout_s=tr.hang_timeout or (p.dist_timeout_minutes * 60 if world > 1 else None),
            state_bytes=num_params(self.cfg.model) * 12 // world,  # fp32 weights and two Adam moments
            timeout_min=p.dist_timeout_minutes,
        )

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def _load(self, path: str) -> None:
        c = self.cfg.checkpoint
        try:
            ckpt.resolve(path)
        except NeoxError:
            if c.finetune or ckpt.list_checkpoints(path) or Path(path, ckpt.LATEST).exists():
                raise
            self._say(f"no checkpoint in {path} yet: starting from scratch")
            return
        if self.cfg.lora.quantize != "none" and stores_4bit(ckpt.resolve(path)):
            quantize_base(self.model, self.cfg.lora, self.layout.world_size)  # a QLoRA run's codes load as they are
        if c.finetune:
            # a plain checkpoint has no LoRA adapters: those start from their initial values
            optional = is_adapter_key if self.cfg.lora.rank else None
            where = ckpt.load_model_weights(path, self.model, optional=optional)
            self._say(f"fine-tuning from the weights of {where} (optimizer, schedule and data start fresh)")
            return
        state = ckpt.load(path, self.model, None if c.no_load_optim else self.optimizer, load_rng=not c.no_load_rng)
        self._restore(state)
        self.resumed = True
        changes = self.schedule.changes_from(state.get("schedule", {}))
        if changes:
            self._say(f"note: the learning-rate schedule differs from the checkpoint's: {'; '.join(changes)}")
        self._say(
            f"resumed from {state['path']} at iteration {self.iteration} ({self.consumed_samples} samples consumed)"
        )

    def _restore(self, state: dict) -> None:
        """The loop's counters and stateful helpers from a loaded checkpoint's trainer state."""
        if self.save_dir is not None and ckpt.resumes(state["path"], self.save_dir):
            self._last_saved = int(state["iteration"])  # that checkpoint is already in the save directory
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consumed_tokens = int(state.get("consumed_tokens", self.consumed_samples * self.seq_length))
        if self.curriculum is not None and state.get("curriculum"):
            self.curriculum.load_state_dict(state["curriculum"])
        if self.diagnostics is not None and self.diagnostics.noise is not None and state.get("noise_scale"):
            self.diagnostics.noise.load_state_dict(state["noise_scale"], self.device)
        if self.precision.scaler is not None and state.get("loss_scaler"):
            self.precision.scaler.load_state_dict(state["loss_scaler"])
        self.guards.load_state_dict(state.get("guard"))

    # ---------------------------------------------------------------- data
    def train_batches(self) -> Iterator[dict]:
        """This rank's training micro-batches of the whole run, in training order, from the first (what
        `neox distill --precompute` runs the teacher over)."""
        it = self._loader(self.train_data, 0)
        return (next(it) for _ in range(self.train_iters * self.accum))

    def _loader(self, dataset, start_sample: int, loop: bool = False) -> Iterator[dict]:
        d = self.cfg.data
        if self.objective is not None:
            lay = self.layout
            return self.objective.batches(
                dataset, self.micro, lay.dp_rank, lay.dp_size, start_sample, eod_id=self.tokenizer.eod_id, loop=loop
            )
        return batches(
            dataset,
            self.micro,
            self.layout.dp_rank,
            self.layout.dp_size,
            start_sample,
            eod_id=self.tokenizer.eod_id,
            reset_position_ids=d.reset_position_ids,
            reset_attention_mask=d.reset_attention_mask,
            eod_mask_loss=d.eod_mask_loss,
            num_workers=d.num_workers,
            loop=loop,
            pin_memory=self.device.type == "cuda",  # host-to-device copies that overlap the running step
        )

    def _next_step_batches(self, it: Iterator[dict]) -> list[dict]:
        micro_batches = [next(it) for _ in range(self.accum)]
        if self.curriculum is None:
            return micro_batches
        # GPT-NeoX asks for the length of iteration + 1, the step about to run; samples keep their order
        length = self.curriculum.advance(self.iteration + 1)
        self._step_tokens = self.global_batch * length
        return [truncate(b, length) for b in micro_batches]

    # ---------------------------------------------------------------- the step
    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step; returns (this rank's loss, the global grad norm, skipped), the two numbers as
        0-d tensors on the device: reading them (log lines) is a host sync, so a step does not. fp16 reads the
        norm once, as the loss scaler must decide on the host whether the step overflowed."""
        # Steps skipped for fp16 overflow do not advance the schedule (DeepSpeed skips its scheduler step).
        lr = self.schedule.apply(self.optimizer, self.iteration - self.skipped_steps)
        scaler = self.precision.scaler
        scale = scaler.scale if scaler is not None else 1.0
        loss = self.runner.forward_backward(micro_batches, loss_scale=scale)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if scale != 1.0:
            scale_grads_(params, 1.0 / scale)  # plain and DTensor gradients may be mixed
        norm = clip_grad_norm_(params, self.cfg.train.gradient_clipping, self.layout.mesh)  # foreach, on the device
        self._verdict = self.guards.verdict(loss, norm)  # on the device; its policy acts when the window is read
        overflow, guarded = self._decide_update(norm, self._verdict)
        if self.diagnostics is not None:
            self.diagnostics.after_clip(self.model, self._logs_after_this_step(), skipped=overflow or guarded)
        if not (overflow or guarded):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if scaler is not None and not guarded:  # a rejected loss is no overflow: the scale did not cause it
            scaler.update(overflow)
        self._lr = lr
        return loss.detach(), norm, overflow

    def _decide_update(self, norm: torch.Tensor, verdict: torch.Tensor) -> tuple[bool, bool]:
        """(fp16 overflow, rejected by the guards) as far as the host must know to skip the update. A fused
        optimizer (without fp16) skips a rejected update on the device, so nothing is read; otherwise one read a
        step: the overflow check fp16 makes anyway and the guards' verdict together (neox.train.guards)."""
        scaler = self.precision.scaler
        if scaler is None and fused_optimizer(self.optimizer):
            self.guards.arm(self.optimizer, verdict)
            return False, False
        finite, code = torch.stack([torch.isfinite(norm).float().to(verdict.device), verdict[0]]).tolist()
        guarded = code > 0
        return scaler is not None and not finite and not guarded, guarded

    def evaluate(self, split: str = "valid") -> dict | None:
        """Mean loss over eval_iters global batches of the valid (next unused slot) or test split."""
        dataset = self.valid_data if split == "valid" else self.test_data
        iters = self.cfg.eval.eval_iters
        if dataset is None or iters <= 0:
            return None
        interval = self.cfg.eval.eval_interval
        slot = self.iteration // interval if split == "valid" and interval > 0 else 0
        it = self._loader(dataset, slot * iters * self.global_batch, loop=True)
        self.model.eval()
        try:
            losses = [self.runner.eval_loss(next(it)) for _ in range(iters * self.accum)]
        finally:
            self.model.train()
        loss = float(mean_over(torch.stack(losses).mean(), self.layout.mesh))
        key = "val" if split == "valid" else "test"
        return {"iteration": self.iteration, f"{key}_loss": loss, f"{key}_ppl": math.exp(min(loss, 700.0))}

    def save(self) -> Path | None:
        if self.save_dir is None or self._last_saved == self.iteration:
            return None
        state = {
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
            "noise_scale": self.diagnostics.noise.state_dict()
            if self.diagnostics is not None and self.diagnostics.noise is not None
            else None,
            "skipped_steps": self.skipped_steps,
            "schedule": self.schedule.state_dict(),
            "loss_scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "guard": self.guards.state_dict(),
        }
        try:
            path = ckpt.save(
                self.save_dir,
                self.iteration,
                self.model,
                self.optimizer,
                state,
                to_dict(self.cfg),
                keep_last_n=self.cfg.checkpoint.keep_last_n_checkpoints,
                saver=self.saver,
                extra=self._adapter_writer(),
            )
        except ckpt.SaveError as e:
            if self.cfg.checkpoint.on_save_error == "continue":
                self._say(f"warning: {e}; training continues (checkpoint.on_save_error: continue)")
                return None
            self._last_saved = self.iteration  # stopping: no second attempt on the way out
            raise
        self._last_saved = self.iteration
        return path

    def _adapter_writer(self):
        """LoRA: the adapters' own files for the checkpoint (gathered on every rank; rank 0 writes them)."""
        if not self.cfg.lora.rank:
            return None
        tensors = adapter_tensors(self.model, self.layout.mesh)
        return lambda directory: write_adapter_files(directory, tensors, self.cfg.lora)

    def _should_save(self) -> bool:
        c = self.cfg.checkpoint
        return self.save_dir is not None and (
            (c.save_interval and self.iteration % c.save_interval == 0) or self.iteration in c.extra_save_iters
        )

    # ---------------------------------------------------------------- the loop
    def fit(self, stop_at: int | None = None) -> dict:
        """Train to train_iters and run the final evaluations; returns the last logged numbers.

        `stop_at` ends early at that iteration with a checkpoint and no final evaluation, as a job that hits
        its time limit would: resuming from that checkpoint continues the same run.
        """
        cfg = self.cfg
        if self.resumed and self.iteration >= self.train_iters:
            # a finished run resumed (a second `make train`): nothing to do, and nothing to log twice
            self._say(
                f"nothing to train: the checkpoint is at iteration {self.iteration} of train.train_iters "
                f"{self.train_iters}; raise train_iters to train further"
            )
            return {"iteration": self.iteration, "skipped_steps": self.skipped_steps}
        end = self.train_iters if stop_at is None else min(stop_at, self.train_iters)
        metrics = Metrics(self.run_dir, cfg.logging, to_dict(cfg), enabled=self.layout.is_logging_rank)
        console = Console(self.train_iters, self.iteration, cfg.logging.progress_bar, enabled=not self.quiet)
        peak = measure_peak_flops(str(self.device), self.precision.compute_dtype, torch.get_num_threads())
        p = cfg.parallel
        self._say(
            f"model: {num_params(cfg.model) / 1e6:.2f}M parameters | batch {self.micro} x {self.accum} "
            f"x dp {self.layout.dp_size} = {self.global_batch} sequences of {self.seq_length} | "
            f"layout dp {self.layout.dp_size} x tp {p.model_parallel_size} x pp {p.pipe_parallel_size}, "
            f"ZeRO {p.zero_stage} | {self.precision.label()} on {self.device} | matmul peak {peak / 1e9:.1f} GFLOP/s"
        )
        summary: dict = {}
        self.profiler = StepProfiler(cfg.logging, self.run_dir, self.device, _rank()) if cfg.logging.profile else None
        self.stopper.arm(self.iteration)
        try:
            self._train_until(end, peak, metrics, console, summary)
            if self.iteration >= self.train_iters:
                self._final_evaluations(metrics, console, summary)
            where = self.save()
            if where is not None:
                console.print(f"saved checkpoint {where}")
            summary["stopped"] = self._stop_report(metrics, console, where)
        except KeyboardInterrupt:
            self._save_before_exit(console, "interrupted")
            raise
        except GuardStop:
            raise  # nothing is saved: the newest checkpoint stays the last one from before the event
        except NeoxError:
            # a user-facing error mid-run (bad data, an unwritable directory) must not cost the steps taken
            self._save_before_exit(console, "stopping on an error")
            raise
        finally:
            self.stopper.disarm()
            if self.profiler is not None:
                self.profiler.close()
                if self.profiler.written:
                    console.print(f"profile written to {self.profiler.dir} ({len(self.profiler.written)} files)")
            if self.saver is not None:
                self.saver.wait()  # the last checkpoint is complete (and `latest`) before returning
            console.close()
            metrics.close()
        summary.update(iteration=self.iteration, skipped_steps=self.skipped_steps)
        summary.update(guard_skipped_steps=self.guards.skipped, rollbacks=self.guards.counts["rollbacks"])
        return summary

    def _stop_report(self, metrics: Metrics, console: Console, where: Path | None) -> dict | None:
        """After a stop for a signal or train.max_runtime: its event in metrics.jsonl and on the console."""
        if self.stopper.reason is None:
            return None
        saved = self._last_saved == self.iteration
        where = where or (self.save_dir / ckpt.checkpoint_name(self.iteration) if saved else None)
        record = self.stopper.stop_record(self.iteration, where, saved)
        metrics.log(record)
        console.print(
            f"stopped at iteration {self.iteration} ({record['reason']}): "
            + ("checkpoint saved; run the same command to resume" if saved else "no checkpoint was saved")
        )
        return record

    def _save_before_exit(self, console: Console, why: str) -> None:
        if self.save_dir is None or self.iteration == 0 or self._last_saved == self.iteration:
            return
        pending = next((e for e in self._unacted_events() if self.guards.policy(e) != "skip"), None)
        if pending is not None:  # its rollback or stop never ran: this state must not become the newest checkpoint
            console.print(
                f"{why}: not saving iteration {self.iteration}: step {pending.iteration} ({pending.describe()}) "
                f"was not acted on ({POLICY_KEYS[pending.code]}: {self.guards.policy(pending)})"
            )
            return
        console.print(f"{why}: saving iteration {self.iteration} before exiting")
        try:
            where = self.save()
        except (NeoxError, OSError) as e:  # the original error is the one to report
            console.print(f"could not save iteration {self.iteration}: {e}")
            return
        console.print(f"saved checkpoint {where}")

    def _train_until(self, end: int, peak: float, metrics: Metrics, console: Console, summary: dict) -> None:
        """Optimizer steps up to iteration `end`, with logging, evaluation and checkpoints on their intervals."""
        log_every = max(1, self.cfg.logging.log_interval)
        self._end = end
        tokens_per_step = self.global_batch * self.seq_length
        fpt = flops_per_token(self.cfg.model)
        # GPT2Dataset builds at least train_iters * global_batch samples (its `len` is one less, as in GPT-NeoX)
        # and wraps past its end, so the training stream never runs out.
        data = self._loader(self.train_data, self.consumed_samples, loop=True)
        window = _Window()
        self._clock = (time.perf_counter(), self.iteration)  # wall time (evaluations, saves too) for the ETA
        while self.iteration < end:
            began = self.iteration
            if self.profiler is not None:
                self.profiler.before_step(began)
            self._timed_step(data, window)
            if self.profiler is not None:
                self.profiler.after_step(began)
            console.advance()
            stop = self.iteration < end and self.stopper.due(self.iteration)  # signals, max_runtime (all ranks)
            if self.iteration % log_every == 0 or self.iteration == end or stop:
                record = self._log_record(window, tokens_per_step, fpt, peak)
                metrics.log(record)
                console.print(format_record(record, self.train_iters))
                summary["loss"] = record["loss"]
                rolled_back = self._act_on_guards(window, metrics, console)
                window = _Window()
                if rolled_back:
                    data = self._loader(self.train_data, self.consumed_samples, loop=True)
                    continue
            if self._valid_due():
                self._eval_and_log("valid", metrics, console, summary)
            if self.cfg.eval.eval_tasks and self._tasks_due():
                self._eval_tasks_and_log(metrics, console, summary)
            if self._should_save():
                if self._act_on_guards(window, metrics, console, logged=False):  # a checkpoint must follow good steps
                    data, window = self._loader(self.train_data, self.consumed_samples, loop=True), _Window()
                    continue
                self.stopper.timed_save(self.save, self.iteration)
            if stop:
                break
        self.stopper.finish()

    def _timed_step(self, data: Iterator[dict], window: _Window) -> None:
        """One optimizer step on the next micro-batches; counts it in the run and in the log window (no host
        sync: the window is read, and timed, at its log line)."""
        if window.steps == 0:
            window.start = time.perf_counter()
        self._window = window  # for a save on the way out (_save_before_exit)
        loss, norm, skipped = self.train_step(self._next_step_batches(data))
        window.add(loss, norm, skipped, self._verdict)
        window.tokens += self._step_tokens
        self.iteration += 1
        self.consumed_samples += self.global_batch
        self.consumed_tokens += self._step_tokens
        self.skipped_steps += skipped

    def _logs_after_this_step(self) -> bool:
        """Whether the step about to run ends with a log line (as `_train_until` decides)."""
        step = self.iteration + 1
        return step % max(1, self.cfg.logging.log_interval) == 0 or step == getattr(self, "_end", self.train_iters)

    def _valid_due(self) -> bool:
        every = self.cfg.eval.eval_interval
        return every > 0 and self.iteration % every == 0

    def _tasks_due(self) -> bool:
        every = self.cfg.eval.eval_tasks_interval
        return bool(every) and self.iteration % every == 0

    def _final_evaluations(self, metrics: Metrics, console: Console, summary: dict) -> None:
        """At train_iters: validation and lm-eval tasks (each unless its interval just ran it), then test."""
        if not self._valid_due():
            self._eval_and_log("valid", metrics, console, summary)
        self._eval_and_log("test", metrics, console, summary)
        if self.cfg.eval.eval_tasks and not self._tasks_due():
            self._eval_tasks_and_log(metrics, console, summary)

    # ---------------------------------------------------------------- numerical guards (neox.train.guards)
    def _act_on_guards(self, w: _Window, metrics: Metrics, console: Console, logged: bool = True) -> bool:
        """Log the events among `w`'s steps not yet acted on and apply their policies (reading the verdicts
        first unless the log line just did); True when the run rolled back. `logged`: the window's losses are
        in `self.losses` already."""
        events = self._unacted_events(w)
        w.handled = w.steps
        acting = None
        for e in events:
            self.guards.count(e)
            policy = self.guards.policy(e)
            samples = list(range(e.first_sample, e.first_sample + self.global_batch))
            metrics.log(event_record(e, policy, samples, [documents_of(self.train_data, i) for i in samples]))
            console.print(f"iter {e.iteration}: {e.describe()}: update skipped ({POLICY_KEYS[e.code]}: {policy})")
            acting = acting or (e if policy != "skip" else None)
        if acting is None:
            return False
        if self.guards.policy(acting) == "stop":
            raise self.guards.stop(acting, self._newest_checkpoint())
        self._roll_back(acting, events[-1], unlogged=0 if logged else w.steps, metrics=metrics, console=console)
        return True

    def _unacted_events(self, w: _Window | None = None) -> list[Event]:
        """The rejected steps of window `w` (default: the current one) no policy has acted on yet (reads the
        verdicts not read so far)."""
        w = w or getattr(self, "_window", None)
        if w is None or w.handled == w.steps:
            return []
        w.read_guards()
        first_iteration = self.iteration - w.steps + 1
        first_sample = self.consumed_samples - w.steps * self.global_batch
        return [
            Event(int(code), first_iteration + i, loss, norm, z, first_sample + i * self.global_batch)
            for i, (code, z, loss, norm) in enumerate(w.read_verdicts[w.handled :], start=w.handled)
            if code > 0
        ]

    def _newest_checkpoint(self, before: int | None = None) -> Path | None:
        found = ckpt.list_checkpoints(self.save_dir) if self.save_dir is not None else []
        found = [p for p in found if before is None or int(p.name.split("_")[1]) < before]
        return found[-1] if found else None

    def _roll_back(self, first: Event, last: Event, unlogged: int, metrics: Metrics, console: Console) -> None:
        """Reload the newest checkpoint from before `first` and go on from the sample after `last`'s batch: the
        batches in between are not trained on (re-running them would lead back to the same state)."""
        if self.saver is not None:
            self.saver.wait()
        good = self._newest_checkpoint(before=first.iteration)
        self.guards.check_rollback_budget(first, good and good.name)
        if good is None:
            raise GuardStop(
                f"step {first.iteration}: {first.describe()}; {POLICY_KEYS[first.code]}: rollback, but "
                f"{self.save_dir} has no checkpoint from before it; stopping, nothing saved"
            )
        left, counts = self.iteration, dict(self.guards.counts)
        state = ckpt.load(good, self.model, self.optimizer, load_rng=True)
        self._restore(state)
        self.guards.counts = {**counts, "rollbacks": counts["rollbacks"] + 1}  # this run's tally, not the checkpoint's
        from_sample, self.consumed_samples = int(state["consumed_samples"]), last.first_sample + self.global_batch
        dropped = max(0, left - unlogged - self.iteration)  # logged steps after the checkpoint: undone
        del self.losses[max(0, len(self.losses) - dropped) :]
        metrics.log(
            {
                "iteration": self.iteration,
                "event": "rollback",
                "from_iteration": left,
                "checkpoint": str(good),
                "skipped_samples": [from_sample, self.consumed_samples],
            }
        )
        console.print(
            f"rolled back from iteration {left} to {good.name}; training goes on from sample {self.consumed_samples} "
            f"(samples {from_sample}..{self.consumed_samples - 1} are not trained on)"
        )

    def _log_record(self, w: _Window, tokens_per_step: int, fpt: int, peak: float) -> dict:
        """The log line of window `w`: its mean loss and norm over the steps not skipped, and its throughput
        (wall time from its first step's data to the end of its last step on the device, which reading the
        losses waits for). `self.losses` gets the window's per-step losses here."""
        losses, norms = w.read(self.layout.mesh)
        seconds = time.perf_counter() - w.start
        self.losses.extend(losses)
        kept = [i for i, skipped in enumerate(w.skipped) if not skipped and not w.guarded(i)]
        counted = len(kept)
        tokens_per_s = w.tokens / seconds if seconds > 0 else 0.0
        record = {
            "iteration": self.iteration,
            "loss": sum(losses[i] for i in kept) / counted if counted else float("nan"),
            "lr": self._lr,
            "grad_norm": sum(norms[i] for i in kept) / counted if counted else float("nan"),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * fpt / (peak * self.layout.world_size) if peak > 0 else 0.0,
            "step_time_s": seconds / max(1, w.steps),
            "peak_mem_bytes": peak_memory_bytes(str(self.device)),
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "guard_skipped": sum(w.guarded(i) for i in range(w.steps)),
            **self._elapsed_and_eta(),
        }
        if self.curriculum is not None:
            record["curriculum_seqlen"] = self.curriculum.current
        if self.diagnostics is not None:
            self.diagnostics.before_log(self.model)
            record.update(self.diagnostics.read())
        if self.precision.scaler is not None:
            record["loss_scale"] = self.precision.scaler.scale
            record["skipped"] = sum(w.skipped)  # overflows; the guards' rejections are guard_skipped
        # routing statistics summed over data-parallel ranks and stages: one collective per log line
        record.update(routing_stats.read(self.model, self.layout.mesh, self.cfg.model.moe_num_experts, self.device))
        if self.distiller is not None:
            record.update(self.distiller.read_stats())  # the KL and LM terms of this rank's steps
        if self.objective is not None:
            record.update(self.objective.read_stats())  # reward margin and accuracy of this rank's steps
        return record

    def _elapsed_and_eta(self) -> dict:
        """Wall seconds since this process started training, and the remaining steps at this run's pace."""
        t0, first = self._clock
        elapsed = time.perf_counter() - t0
        done = self.iteration - first
        eta = elapsed / done * (self.train_iters - self.iteration) if done > 0 else float("nan")
        return {"elapsed_s": elapsed, "eta_s": eta}

    def _eval_tasks_and_log(self, metrics: Metrics, console: Console, summary: dict) -> None:
        """lm-evaluation-harness tasks (eval.eval_tasks, through `evaluate_tasks`) on the current weights, logged
        as eval_tasks/TASK/METRIC. Every rank runs the same requests in the same order, so sharded models see
        matching collectives."""
        if self.cfg.parallel.pipe_parallel_size > 1:
            console.print("eval_tasks skipped: lm-eval needs the whole model in each process (no pipeline stages)")
            return
        with torch.no_grad():
            scores = self.evaluate_tasks(self.model, self.tokenizer)
        record = {"iteration": self.iteration, **{f"eval_tasks/{k}": v for k, v in scores.items()}}
        metrics.log(record)
        console.print(
            f"iter {self.iteration:>6}/{self.train_iters} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items())
        )
        summary.update({k: v for k, v in record.items() if k != "iteration"})

    def _eval_and_log(self, split: str, metrics: Metrics, console: Console, summary: dict) -> None:
        record = self.evaluate(split)
        if record is None:
            return
        metrics.log(record)
        console.print(format_record(record, self.train_iters))
        summary.update({k: v for k, v in record.items() if k != "iteration"})
