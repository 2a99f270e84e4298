"""A torchrun worker's trainer: its `Layout` in the mesh and the config a restarted or resumed run trains with.

`Trainer(resume_config(cfg), layout=make_layout(cfg))`; one process gets the default Layout and no
torch.distributed at all.
"""

from __future__ import annotations

import copy

from neox.errors import ConfigError, NeoxError
from neox.kernels.device import resolve_device
from neox.parallel.launch import resume_dir
from neox.parallel.mesh import dp_rank_and_size, init_distributed, is_logging_rank
from neox.train.checkpoint import saved_config
from neox.train.trainer import Layout


def make_layout(cfg, source: str = "config") -> Layout:
    """Validate the layout for this process's world (torchrun's environment), then create the process group
    and mesh. One process: the default Layout, no torch.distributed at all."""
    device = resolve_device(cfg.train.device, "train.device")  # under torchrun: this rank's own GPU
    dims, mesh = init_distributed(cfg.parallel, cfg.model, device, source)
    if mesh is None:
        return Layout()
    dp_rank, dp_size = dp_rank_and_size(mesh)
    return Layout(
        mesh=mesh, dp_rank=dp_rank, dp_size=dp_size, world_size=dims.world_size, is_logging_rank=is_logging_rank(mesh)
    )


def resume_config(cfg):
    """The config a run that may resume trains with (a copy when anything changes):

    - after torchrun restarted the workers (--max-restarts), a run without checkpoint.load resumes from its
      own save directory's latest checkpoint;
    - when resuming with model.vocab_size unset, the checkpoint's padded vocabulary is kept: padding depends
      on the tensor-parallel size, and a checkpoint must resume under any other layout.
    """
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
