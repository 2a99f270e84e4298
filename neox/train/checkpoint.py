"""Checkpoints: torch.distributed.checkpoint (DCP) shards, written atomically, with a `latest` pointer.

Layout (docs/architecture.md):
    SAVE/latest                 name of the newest complete checkpoint
    SAVE/iter_0000020/          DCP shards of {"model", "optim"}; config.yml; trainer_state.pt

A checkpoint is written to `iter_XXXXXXX.tmp`; when every file is in place (DCP fsyncs its shards, neox its own
files) the sizes and sha256 of all of them go to `manifest.json` (neox/train/manifest.py), the directory is
fsynced and renamed, and `latest` is replaced (write, fsync, rename, fsync of the run directory) after that, so
a crash at any point leaves the previous checkpoint as `latest`. A save that fails (disk full, no permission)
removes only its own `.tmp` directory and raises `SaveError`, one line, on every rank; the next save removes
the `.tmp` directories that crashed saves (kill -9) left.

Loading verifies the manifest (every file present, its size, its sha256, read in 8 MiB chunks; the files are
split over the ranks) and says so in one line; a damaged or incomplete checkpoint is named with what is wrong and
the newest good one before it is used instead. Hashing reads the whole checkpoint once: about a second per
GB per rank. Checkpoints written before manifests existed load unverified, with a note. Every rank's RNG
streams go into trainer_state.pt (neox/train/rng_state.py).
Model and optimizer go through get_state_dict / set_state_dict, which give parameter-name keys without
wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) and DTensor shards under FSDP/TP, so a
checkpoint saved under one parallel layout loads under another; `load_full_model_state` and `consolidate`
read any layout's shards whole in one process, without torch.distributed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import warnings
from pathlib import Path

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
from neox.train import manifest
from neox.train.manifest import MANIFEST as MANIFEST
from neox.train.manifest import fsync_dir, fsync_file, gather, note, rank, write_atomic
from neox.train.rng_state import LEGACY_NUMPY_GLOBALS, all_rng_states, set_rng_state
from neox.train.rng_state import rng_state as rng_state

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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class SaveError(NeoxError):
    """A checkpoint could not be written (disk full, no permission); every earlier checkpoint is untouched."""


def _reason(e: BaseException) -> str:
    """Why a write failed, in one line: the OS error's text (DCP wraps it in a CheckpointException)."""
    if isinstance(e, CheckpointException) and e.failures:
        failure = next(iter(e.failures.values()))
        return _reason(getattr(failure, "exc", failure))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


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


def read_latest(path: Path) -> str:
    """The checkpoint name a `latest` file holds (one line of text), or a one-line error naming the file."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError) as e:
        reason = "not text" if isinstance(e, UnicodeDecodeError) else e.strerror
        raise NeoxError(
            f"{path}: unreadable ({reason}); it should hold the name of the newest checkpoint, e.g. iter_0000020"
        ) from None


def newest_name(save_dir: str | Path) -> str | None:
    """The checkpoint `latest` names, else the highest-numbered one; None when there is none."""
    found = list_checkpoints(save_dir)
    latest = Path(save_dir) / LATEST
    if latest.is_file():
        return read_latest(latest) or None
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
    if rank() == 0 and d.is_dir():
        gone = [p for p in d.iterdir() if p.is_dir() and _NAME.match(re.sub(r"\.(tmp|old)$", "", p.name))]
        for p in gone:
            shutil.rmtree(p)
        (d / LATEST).unlink(missing_ok=True)
    _barrier()
    return gone


def resolve(path: str | Path, verify: bool = False, announce: bool = False) -> Path:
    """A run directory (follows its `latest` pointer) or one checkpoint directory -> the checkpoint directory.

    In a run directory a checkpoint without .metadata (or, with `verify`, one whose files do not match its
    manifest) is skipped with one line saying what is wrong, and the newest good one older than it is used.
    `verify` hashes every file once per process (the files are split over the ranks: then it is collective);
    `announce` also prints a line when the files match.
    """
    p = Path(path)
    if (p / LATEST).is_file():
        return _newest_good(p, verify, announce)
    if (p / ".metadata").is_file():
        problem = manifest.verified(p, announce) if verify else None
        if problem:
            raise NeoxError(f"{p}: the checkpoint is damaged ({problem}); use another checkpoint (or copy it again)")
        return p
    if p.is_dir() and list_checkpoints(p):
        raise NeoxError(f"{p} has checkpoints but no '{LATEST}' file; pass one of them, e.g. {list_checkpoints(p)[-1]}")
    raise NeoxError(
        f"{p} is not a checkpoint: expected a run directory with a '{LATEST}' file "
        f"or a checkpoint directory (iter_XXXXXXX)"
    )


def _number(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _newest_good(run: Path, verify: bool, announce: bool) -> Path:
    """`latest`'s checkpoint, else (damaged or incomplete) the newest good one before it."""
    name = read_latest(run / LATEST)
    newest = _number(name)
    older = [c for c in reversed(list_checkpoints(run)) if newest is None or _number(c.name) < newest]
    for candidate in [run / name, *older]:
        if not (candidate / ".metadata").is_file():
            problem = "missing" if not candidate.is_dir() else "no .metadata: its save did not finish"
        else:
            problem = manifest.verified(candidate, announce) if verify else None
        if problem is None:
            return candidate
        if verify or candidate.name == name:
            note(f"warning: checkpoint {candidate} is unusable ({problem}); trying the one before it")
    raise NeoxError(
        f"{run / LATEST} points to {name!r}, which is not a complete and intact checkpoint, and no good one is "
        f"left in {run}; start afresh or copy a checkpoint back"
    )


def _write_state(tmp: Path, state: dict, config: dict) -> None:
    torch.save(state, tmp / STATE_FILE)
    fsync_file(tmp / STATE_FILE)
    write_atomic(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))


def _kept(save_dir: Path) -> str:
    try:
        newest = newest_name(save_dir)
    except OSError:
        newest = None
    return f"the earlier checkpoints are untouched (latest: {newest})" if newest else "no earlier checkpoint exists"


def _check(error: str | None, save_dir: Path, final: Path, tmp: Path) -> None:
    """Every rank learns the first error any rank met; then only this save's `.tmp` goes and SaveError rises."""
    error = next((e for e in gather(error) if e), None)
    if error is None:
        return
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise SaveError(f"checkpoint: could not save {final.name} in {save_dir} ({error}); {_kept(save_dir)}")


def _failed(save_dir: Path, final: Path, tmp: Path, e: BaseException) -> None:
    _check(_reason(e), save_dir, final, tmp)


def _remove_unfinished(save_dir: Path) -> None:
    """Remove the `.tmp` directories crashed saves left (a kill -9, a lost node): once any earlier async save
    has finished, no other save of this run is in flight, and one whose iteration is never saved again (another
    save_interval or train_iters on resume) would otherwise hold its disk space for good."""
    if not save_dir.is_dir():
        return
    for p in save_dir.iterdir():
        if p.is_dir() and p.name.endswith(".tmp") and _NAME.match(p.name[: -len(".tmp")]):
            shutil.rmtree(p)


def save(
    save_dir: str | Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    config: dict,
    keep_last_n: int | None = None,
    saver=None,
    extra=None,
) -> Path:
    """Write checkpoint `iteration` (collective when a process group exists); returns its final directory.

    `extra(directory)` writes more files into the checkpoint on rank 0 (LoRA's adapter files), with the
    trainer state: the manifest covers them and they appear with the rest.

    With `saver` (a neox.parallel.dcp.AsyncSaver) the shards are written in the background and the rename,
    `latest` update and pruning happen when that save completes (at the next save or `saver.wait()`).
    """
    _quiet_dcp()
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(iteration)
    tmp = save_dir / (final.name + ".tmp")
    if saver is not None:
        saver.wait()  # finish the previous save first: its .tmp is not a leftover
    error = None
    if rank() == 0:
        try:
            _remove_unfinished(save_dir)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _reason(e)
    _check(error, save_dir, final, tmp)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rngs = all_rng_states()
    if rank() == 0:
        try:
            _write_state(tmp, {**trainer_state, "iteration": iteration, "rng": rngs}, config)
            if extra is not None:
                extra(tmp)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            error = _reason(e)
    _check(error, save_dir, final, tmp)
    finish = functools.partial(_publish, save_dir, tmp, final, keep_last_n)
    fail = functools.partial(_failed, save_dir, final, tmp)
    if saver is None:
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        except (OSError, RuntimeError, CheckpointException) as e:
            fail(e)
        finish()
    else:
        saver.save({"model": model_sd, "optim": optim_sd}, tmp, on_done=finish, on_error=fail)
    return final


def _publish(save_dir: Path, tmp: Path, final: Path, keep_last_n: int | None) -> None:
    """Every rank has written its shards into `tmp`: each hashes its own (`__RANK_*`), rank 0 the rest and
    writes the manifest, moves the directory into place and points `latest` at it; then old ones are pruned."""
    _barrier()
    error, files = None, {}
    try:
        files = manifest.describe(tmp, sorted(p.name for p in tmp.glob(f"__{rank()}_*")))
    except OSError as e:
        error = _reason(e)
    gathered = gather((files, error))
    error = next((e for _, e in gathered if e), None)
    if rank() == 0 and error is None:
        try:
            _move_into_place(save_dir, tmp, final, {k: v for f, _ in gathered for k, v in f.items()})
        except OSError as e:
            error = _reason(e)
    _check(error, save_dir, final, tmp)
    if rank() == 0 and keep_last_n:
        for old in list_checkpoints(save_dir)[:-keep_last_n]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _move_into_place(save_dir: Path, tmp: Path, final: Path, files: dict) -> None:
    manifest.write(tmp, files)
    previous = final.with_name(final.name + ".old")
    if final.exists():  # re-saving the same iteration: the earlier copy goes only once the new one is in place
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    try:
        os.replace(tmp, final)
    except OSError:
        if previous.exists():
            os.replace(previous, final)
        raise
    fsync_dir(save_dir)
    write_atomic(save_dir / LATEST, final.name + "\n")
    shutil.rmtree(previous, ignore_errors=True)


def load(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, load_rng: bool = True
) -> dict:
    """Restore model (and optimizer and this rank's RNG, when asked) from a checkpoint or run directory.

    Returns the saved trainer state (iteration, consumed samples, schedule, loss scaler, ...) with
    "path" added. With optimizer=None only the weights are loaded (fine-tuning).
    """
    ckpt = resolve(path, verify=True, announce=True)
    if optimizer is None:
        load_model_weights(ckpt, model)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _dcp_load({"model": model_sd, "optim": optim_sd}, ckpt)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = _read_state(ckpt / STATE_FILE)
    if load_rng:
        rngs = state["rng"]
        me = rank()
        if me < len(rngs):
            set_rng_state(rngs[me])
    state["path"] = str(ckpt)
    return state


def _read_state(path: Path) -> dict:
    """trainer_state.pt without unpickling arbitrary objects (weights_only: tensors and plain containers)."""
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, weights_only=True)
    except Exception as e:  # a damaged or foreign file: weights_only refuses what it does not know
        lines = str(e).strip().splitlines()
        raise NeoxError(f"{path}: cannot read the trainer state ({lines[0] if lines else type(e).__name__})") from None


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


def load_model_weights(checkpoint_path: str | Path, model: nn.Module, optional=None) -> Path:
    """Load only the weights of a checkpoint (a run dir means its latest good one) into `model`; returns the dir.

    `optional(name) -> bool` names parameters the checkpoint may lack (LoRA adapters fine-tuning a plain
    checkpoint): those it lacks keep their values; every other parameter must be there."""
    ckpt = resolve(checkpoint_path, verify=True)
    model_sd = get_model_state_dict(model)
    if optional is not None:
        saved = tensor_entries(ckpt)
        model_sd = {k: v for k, v in model_sd.items() if k in saved or not optional(k)}
    _dcp_load({"model": model_sd}, ckpt)
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=optional is None))
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
    ckpt = resolve(checkpoint, verify=True)
    out = Path(out)
    config = saved_config(ckpt)  # before the folder and the shards: a checkpoint without one fails at once
    ensure_dir(out.parent, "OUT's folder")
    state = load_full_model_state(ckpt, dtype)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"config": config, "model": state}, tmp)
    tmp.replace(out)
    return ckpt
