"""Checkpoints: torch.distributed.checkpoint (DCP) shards, written atomically, with a `latest` pointer.

Layout (docs/architecture.md):
    SAVE/latest                 name of the newest complete checkpoint
    SAVE/iter_0000020/          DCP shards of {"model", "optim"}; config.yml; trainer_state.pt

A checkpoint is written to `iter_XXXXXXX.tmp` and renamed when every file is in place; `latest` is replaced
(write-then-rename) after that, so a crash at any point leaves the previous checkpoint as `latest`.
Model and optimizer go through get_state_dict / set_state_dict, which give parameter-name keys without
wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) and DTensor shards under FSDP/TP, so a
checkpoint saved under one parallel layout loads under another; `load_full_model_state` and `consolidate`
read any layout's shards whole in one process, without torch.distributed.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from neox.config.yaml_io import read_config_file
from neox.errors import ConfigError, NeoxError, ensure_dir

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yml"
_NAME = re.compile(r"^iter_(\d+)$")


def _quiet_dcp() -> None:
    """DCP warns on every call (also from async_save's thread) that with no process group it assumes one
    process: that is the intent of a single-process run. Installed per call because callers (pytest, for one)
    may reset the warning filters after import; an identical filter replaces itself rather than piling up."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `save_dir`, oldest first (unfinished `.tmp` directories are not listed)."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resumes(load: str | Path, save: str | Path) -> bool:
    """Whether `load` is the run directory `save` or one of its checkpoints: the run continues itself."""
    load, save = Path(load).resolve(), Path(save).resolve()
    return load == save or load.parent == save


def newest_name(save_dir: str | Path) -> str | None:
    """The checkpoint `latest` names, else the highest-numbered one; None when there is none."""
    found = list_checkpoints(save_dir)
    latest = Path(save_dir) / LATEST
    if latest.is_file():
        return latest.read_text().strip() or None
    return found[-1].name if found else None


def check_run_dirs(save: str | None, load: str | None, overwrite: bool) -> None:
    """Before training: a load directory must exist (unless it is the run's own save directory: resume if
    there is something), and a save directory holding another run's checkpoints is refused unless `overwrite`,
    so a new run never replaces a finished one by accident."""
    resuming = bool(load and save) and resumes(load, save)
    if load and not resuming and not Path(load).exists():
        raise ConfigError(
            f"checkpoint.load: {load} does not exist; check the path, or leave load unset to start a fresh run"
        )
    if not save or overwrite or resuming:
        return
    newest = newest_name(save)
    if newest is not None:
        raise ConfigError(
            f"checkpoint.save: {save} already holds a run's checkpoints (newest {newest}); resume it with "
            f"--set load={save}, or save elsewhere with --set save=DIR (--set overwrite=true replaces them)"
        )


def clear_checkpoints(save_dir: str | Path) -> list[Path]:
    """Remove every checkpoint (complete or not) and `latest` from `save_dir` (rank 0); returns what went."""
    d = Path(save_dir)
    gone = []
    if _rank() == 0 and d.is_dir():
        gone = [p for p in d.iterdir() if p.is_dir() and _NAME.match(p.name.removesuffix(".tmp"))]
        for p in gone:
            shutil.rmtree(p)
        (d / LATEST).unlink(missing_ok=True)
    _barrier()
    return gone


def resolve(path: str | Path) -> Path:
    """A run directory (follows its `latest` pointer) or one checkpoint directory -> the checkpoint directory."""
    p = Path(path)
    if (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()
        target = p / name
        if not (target / ".metadata").is_file():
            complete = [c.name for c in list_checkpoints(p) if (c / ".metadata").is_file()]
            fix = (
                f"edit {p / LATEST} to name one of: {complete}" if complete else "no complete checkpoint is left there"
            )
            raise NeoxError(
                f"{p / LATEST} points to {name!r}, which is not a complete checkpoint (no .metadata); {fix}"
            )
        return target
    if (p / ".metadata").is_file():
        return p
    if p.is_dir() and list_checkpoints(p):
        raise NeoxError(f"{p} has checkpoints but no '{LATEST}' file; pass one of them, e.g. {list_checkpoints(p)[-1]}")
    raise NeoxError(
        f"{p} is not a checkpoint: expected a run directory with a '{LATEST}' file "
        f"or a checkpoint directory (iter_XXXXXXX)"
    )


def rng_state() -> dict:
    """This process's RNG streams: Python, NumPy, torch's CPU generator and, when CUDA is in use, the
    generator of this rank's own GPU (the current device) only, so a checkpoint restores on any GPU count."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s streams; the saved GPU stream goes to the current device whatever the device
    count (none: only the CPU streams are restored). Checkpoints written before the GPU state was per rank hold
    every GPU's state in a list: the current device's entry is taken when there is one."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


def _all_rng_states() -> list[dict]:
    """Every rank's RNG state (rank order), so each rank resumes its own dropout stream."""
    mine = rng_state()
    if not dist.is_initialized():
        return [mine]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(
    save_dir: str | Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    config: dict,
    keep_last_n: int | None = None,
    saver=None,
) -> Path:
    """Write checkpoint `iteration` (collective when a process group exists); returns its final directory.

    With `saver` (a neox.parallel.dcp.AsyncSaver) the shards are written in the background and the rename,
    `latest` update and pruning happen when that save completes (at the next save or `saver.wait()`).
    """
    _quiet_dcp()
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(iteration)
    tmp = save_dir / (final.name + ".tmp")
    if saver is not None:
        saver.wait()  # finish the previous save first: it may be the leftover removed below
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a crashed save
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rngs = _all_rng_states()
    if _rank() == 0:
        torch.save({**trainer_state, "iteration": iteration, "rng": rngs}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    finish = functools.partial(_publish, save_dir, tmp, final, keep_last_n)
    if saver is None:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        finish()
    else:
        saver.save({"model": model_sd, "optim": optim_sd}, tmp, on_done=finish)
    return final


def _publish(save_dir: Path, tmp: Path, final: Path, keep_last_n: int | None) -> None:
    """Every rank has written its shards into `tmp`: move it into place, then point `latest` at it."""
    _barrier()
    if _rank() == 0:
        if final.exists():  # re-saving the same iteration (e.g. end of a run that just saved)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(save_dir / LATEST, final.name + "\n")
        if keep_last_n:
            for old in list_checkpoints(save_dir)[:-keep_last_n]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, load_rng: bool = True
) -> dict:
    """Restore model (and optimizer and this rank's RNG, when asked) from a checkpoint or run directory.

    Returns the saved trainer state (iteration, consumed samples, schedule, loss scaler, ...) with
    "path" added. With optimizer=None only the weights are loaded (fine-tuning).
    """
    ckpt = resolve(path)
    if optimizer is None:
        load_model_weights(ckpt, model)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _dcp_load({"model": model_sd, "optim": optim_sd}, ckpt)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    if load_rng:
        rngs = state["rng"]
        rank = _rank()
        if rank < len(rngs):
            set_rng_state(rngs[rank])
    state["path"] = str(ckpt)
    return state


def _dcp_load(state_dict: dict, ckpt: Path) -> None:
    _quiet_dcp()
    try:
        dcp.load(state_dict, checkpoint_id=str(ckpt))
    except (Exception, CheckpointException) as e:  # DCP reports key/shape mismatches from its planner
        msg = str(e).strip().splitlines()
        raise NeoxError(
            f"{ckpt}: checkpoint does not match this model/optimizer "
            f"({msg[-1] if msg else type(e).__name__}); check the config it was saved with "
            f"({ckpt / CONFIG_FILE})"
        ) from e


def load_model_weights(checkpoint_path: str | Path, model: nn.Module) -> Path:
    """Load only the weights of a checkpoint (a run dir means its latest) into `model`; returns the dir."""
    ckpt = resolve(checkpoint_path)
    model_sd = get_model_state_dict(model)
    _dcp_load({"model": model_sd}, ckpt)
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=True))
    return ckpt


def saved_config(checkpoint_path: str | Path) -> dict:
    """The resolved config (nested dict) a checkpoint was trained with."""
    ckpt = resolve(checkpoint_path)
    f = ckpt / CONFIG_FILE
    if not f.is_file():
        raise NeoxError(f"{f} is missing; this checkpoint was not written by neox train")
    return read_config_file(str(f))  # a damaged file is a one-line ConfigError naming it


# ---------------------------------------------------------------- one process, any layout


def tensor_entries(checkpoint_dir: str | Path, prefix: str = "model.") -> dict[str, TensorStorageMetadata]:
    """Global shapes and dtypes of the tensors saved under `prefix` (keys without the prefix)."""
    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        raise NeoxError(f"{path} is not a DCP checkpoint directory (no .metadata file)")
    meta = FileSystemReader(str(path)).read_metadata()
    return {
        k[len(prefix) :]: v
        for k, v in meta.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }


def load_full_model_state(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model state dict (parameter name -> full tensor) of a sharded checkpoint, read in one
    process without torch.distributed, whatever layout saved it."""
    entries = tensor_entries(checkpoint_dir)
    if not entries:
        raise NeoxError(f"{checkpoint_dir}: the checkpoint holds no model tensors")
    model = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items()}
    _quiet_dcp()  # no_dist=True is the intent here, not something to warn about
    try:
        dcp.load({"model": model}, storage_reader=FileSystemReader(str(checkpoint_dir)), no_dist=True)
    except (Exception, CheckpointException) as e:  # a shard missing or cut short (DCP wraps the OSError/EOFError)
        lines = str(e).strip().splitlines()
        raise NeoxError(
            f"{checkpoint_dir}: cannot read the checkpoint's shards ({lines[-1] if lines else type(e).__name__}); "
            "it is incomplete or damaged: use another checkpoint (or copy it again)"
        ) from None
    if dtype is not None:
        model = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.items()}
    return model


def consolidate(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model weights of `checkpoint` (a run directory: its latest; or one iter_* directory) and the
    config they were trained with to one torch.save file, ``{"config": nested config dict, "model": parameter
    name -> full tensor}``, so that the file alone rebuilds the model:
    ``saved = torch.load(out); GPT(from_dict(saved["config"]).model).load_state_dict(saved["model"])``."""
    ckpt = resolve(checkpoint)
    out = Path(out)
    config = saved_config(ckpt)  # before the folder and the shards: a checkpoint without one fails at once
    ensure_dir(out.parent, "OUT's folder")
    state = load_full_model_state(ckpt, dtype)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"config": config, "model": state}, tmp)
    tmp.replace(out)
    return ckpt
