"""What the trainer takes from neox.parallel in a torchrun worker: `Trainer(cfg, **trainer_args(cfg))`.

- layout: where this process sits (mesh, data-parallel rank and size, whether it logs);
- parallelize: `neox.parallel.apply` with the run's precision;
- runner_cls: gradient sync only on the last micro-batch, loss_parallel when the logits are vocab-sharded.
One process gets the defaults (no torch.distributed at all).
"""

from __future__ import annotations

import copy
import functools

from neox.parallel.compose import apply
from neox.parallel.fsdp import set_gradient_sync
from neox.parallel.launch import resume_dir
from neox.parallel.mesh import dp_rank_and_size, init_distributed, is_logging_rank
from neox.parallel.reduce import loss_context
from neox.train.trainer import Layout, StepRunner, resolve_device


def make_layout(cfg, device_type: str = "cpu", source: str = "config") -> Layout:
    """Validate the layout for this process's world (torchrun's environment), then create the process group
    and mesh. One process: the default Layout, no torch.distributed at all."""
    dims, mesh = init_distributed(cfg.parallel, cfg.model, device_type, source)
    if mesh is None:
        return Layout()
    dp_rank, dp_size = dp_rank_and_size(mesh)
    return Layout(
        mesh=mesh, dp_rank=dp_rank, dp_size=dp_size, world_size=dims.world_size, is_logging_rank=is_logging_rank(mesh)
    )


class ParallelStepRunner(StepRunner):
    def __init__(self, model, precision, layout, cfg, device):
        super().__init__(model, precision, layout, cfg, device)
        self.vocab_parallel = cfg.parallel.model_parallel_size > 1

    def sync_gradients(self, last: bool) -> None:
        set_gradient_sync(self.model, last)

    def loss_context(self):
        return loss_context(self.vocab_parallel)


def trainer_args(cfg, source: str = "config") -> dict:
    """Keyword arguments of Trainer for this process: layout, parallelize and runner_cls."""
    device_type = resolve_device(cfg.train.device).type
    layout = make_layout(cfg, device_type, source)
    if layout.mesh is None:
        return {"layout": layout}
    parallelize = functools.partial(
        apply,
        pcfg=cfg.parallel,
        mesh=layout.mesh,
        precision=cfg.precision.precision,
        bf16_mode=cfg.precision.bf16_mode,
        device_type=device_type,
    )
    if layout.mesh["pp"].size() > 1:
        # stages of the model, each parallelized as above, run by a pipeline schedule
        from neox.parallel.pipeline import trainer_hooks

        split, runner_cls = trainer_hooks(cfg, layout.mesh, parallelize)
        return {"layout": layout, "parallelize": split, "runner_cls": runner_cls}
    return {"layout": layout, "parallelize": parallelize, "runner_cls": ParallelStepRunner}


def resume_config(cfg):
    """The config a run that may resume trains with (a copy when anything changes):

    - after torchrun restarted the workers (--max-restarts), a run without checkpoint.load resumes from its
      own save directory's latest checkpoint;
    - when resuming with model.vocab_size unset, the checkpoint's padded vocabulary is kept: padding depends
      on the tensor-parallel size, and a checkpoint must resume under any other layout.
    """
    from neox.errors import ConfigError, NeoxError
    from neox.train.checkpoint import saved_config

    load = resume_dir(cfg.checkpoint.load, cfg.checkpoint.save)
    vocab = None
    if load and cfg.model.vocab_size is None:
        try:
            vocab = saved_config(load).get("model", {}).get("vocab_size")
        except ConfigError:
            raise  # a checkpoint is there but its config.yml is damaged: say so rather than train past it
        except NeoxError:
            pass  # nothing saved there yet: the run starts fresh and pads as usual
    if load == cfg.checkpoint.load and vocab is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.checkpoint.load = load
    if vocab is not None:
        tp = cfg.parallel.model_parallel_size
        if int(vocab) % tp:
            raise ConfigError(
                f"{load}: the checkpoint's padded vocabulary ({vocab}) cannot be split over "
                f"model_parallel_size={tp}; resume with a tensor-parallel size that divides it"
            )
        cfg.model.vocab_size = int(vocab)
    return cfg
