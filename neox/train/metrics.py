"""Where training numbers go: metrics.jsonl (always), console, progress bar, TensorBoard and W&B (optional).

Also the two measurements MFU needs: the device's achievable matmul rate in the training dtype (measured,
not taken from a spec sheet) and peak memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neox.config.schema import LoggingConfig
from neox.errors import NeoxError
from neox.kernels.bf16_cpu import bf16_matmul_mode

METRICS_FILE = "metrics.jsonl"


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _peak_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neox" / "matmul_peak.json"


def _measure_matmul(dev: torch.device, dtype: torch.dtype) -> float:
    """Best square-matmul (F.linear) FLOP/s over growing sizes (sub-second in all), through the same bf16
    path training takes (neox.kernels.bf16_cpu on CPUs without bf16 arithmetic)."""
    mode = bf16_matmul_mode(dtype, dev.type)
    with mode if mode is not None else contextlib.nullcontext():
        return _best_linear_rate(dev, dtype)


def _best_linear_rate(dev: torch.device, dtype: torch.dtype) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)  # a private generator: measuring must not shift training's RNG
    # Up to 1024 (CPU) / 4096 (GPU), where kernels reach their steady rate; not bigger once one product
    # takes 50 ms (a dtype without hardware support). Small sizes alone are not enough: on a busy machine
    # each op can stall for milliseconds, which swamps a sub-millisecond product.
    largest = 4096 if dev.type == "cuda" else 1024
    best = 0.0
    n = 256
    while True:
        a = torch.randn(n, n, generator=gen).to(dev, dtype)
        b = torch.randn(n, n, generator=gen).to(dev, dtype)
        # F.linear, not `@`: it is what the model's layers call, and on CPUs without native bf16 it takes
        # the oneDNN path, several times faster than bf16 `@` there (which would understate the peak).
        F.linear(a, b)  # warm-up: kernel selection and first-touch of the output
        sync()
        reps, t0 = 0, time.perf_counter()
        while True:
            F.linear(a, b)
            reps += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed > 0.05 or reps >= 50:
                break
        best = max(best, 2.0 * n**3 * reps / elapsed)
        if elapsed / reps > 0.05 or n >= largest:
            return best
        n *= 2


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """One measurement of the matmul FLOP/s now, not kept on disk (`neox bench` takes the peak of its own run
    for its MFU column, measured between the engines' runs)."""
    return _measure_matmul(torch.device(device), dtype)


@functools.cache
def measure_peak_flops(device: str, dtype: torch.dtype, threads: int) -> float:
    """The matmul FLOP/s MFU is measured against: this device's best rate in `dtype` with `threads` threads.

    Measured once per process (sub-second) and kept on disk per (device model, dtype, threads) as the best
    ever seen, because on a shared machine a single measurement taken while other jobs run is too low and
    would inflate MFU. Delete ~/.cache/neox/matmul_peak.json to start over.
    """
    dev = torch.device(device)
    measured = _measure_matmul(dev, dtype)
    path_name = "|fp32 blocks" if bf16_matmul_mode(dtype, dev.type) is not None else ""
    key = f"{_device_name(dev)}|{str(dtype).replace('torch.', '')}{path_name}|{threads} threads"
    path = _peak_cache()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    best = max(measured, float(cache.get(key, 0.0)))
    if best > cache.get(key, 0.0):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**cache, key: best}, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs the cache
    return best


def peak_memory_bytes(device: str) -> int:
    """Peak memory of this process: CUDA max allocated on GPU, else the peak resident set size."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# metrics.jsonl keys -> TensorBoard / W&B tags, grouped as GPT-NeoX groups its charts (train/, validation/,
# test/, runtime/) so dashboards built for GPT-NeoX runs read neox runs too. Keys that already carry a group
# ("eval_tasks/lambada/acc", "moe/aux_loss") keep it; any other key is a training quantity.
TAGS = {
    "loss": "train/lm_loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "loss_scale": "train/loss_scale",
    "skipped": "train/skipped_iters",
    "val_loss": "validation/lm_loss",
    "val_ppl": "validation/lm_loss_ppl",
    "test_loss": "test/lm_loss",
    "test_ppl": "test/lm_loss_ppl",
    "tokens_per_s": "runtime/tokens_per_sec",
    "mfu": "runtime/mfu",
    "step_time_s": "runtime/iteration_time",
    "peak_mem_bytes": "runtime/peak_mem_bytes",
    "elapsed_s": "runtime/elapsed_s",
    "eta_s": "runtime/eta_s",
}


def tag(key: str) -> str:
    """The TensorBoard / W&B name of a metrics.jsonl key."""
    return TAGS.get(key) or (key if "/" in key else f"train/{key}")


def _finite(value):
    """JSON has no NaN/inf; write them as strings so the file stays valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Metrics:
    """Fans one record out to every enabled sink. Only the writing rank should have `enabled=True`."""

    def __init__(
        self, run_dir: str | Path | None, cfg: LoggingConfig, config_dict: dict | None = None, enabled: bool = True
    ):
        self.enabled = enabled
        self.path = None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(run_dir) / METRICS_FILE
            self._jsonl = open(self.path, "a", encoding="utf-8")  # appended across resumes
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise NeoxError(
                    "logging.tensorboard_dir is set but TensorBoard is not installed: "
                    "pip install 'neox[tensorboard]' or remove tensorboard_dir"
                ) from None
            self._tb = SummaryWriter(log_dir=cfg.tensorboard_dir)
        if cfg.use_wandb and cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise NeoxError(
                    "logging.use_wandb is true but wandb is not installed: "
                    "pip install 'neox[wandb]' or set use_wandb: false"
                ) from None
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                group=cfg.wandb_group,
                mode=cfg.wandb_mode,
                dir=str(run_dir) if run_dir else None,
                config=config_dict or {},
            )

    def log(self, record: dict) -> None:
        """Write one record (it must carry "iteration")."""
        if not self.enabled:
            return
        step = int(record["iteration"])
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
            self._jsonl.flush()
        scalars = {
            k: v
            for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        scalars = {tag(k): v for k, v in scalars.items()}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def format_record(r: dict, total_iters: int) -> str:
    """One console line for a training or evaluation record."""
    parts = [f"iter {r['iteration']:>6}/{total_iters}"]
    if "val_loss" in r or "test_loss" in r:
        split = "val" if "val_loss" in r else "test"
        parts += [f"{split} loss {r[f'{split}_loss']:.4f}", f"{split} ppl {r[f'{split}_ppl']:.2f}"]
        return " | ".join(parts)
    parts.append(f"loss {r['loss']:.4f}")
    parts.append(f"lr {r['lr']:.3e}")
    parts.append(f"grad {r['grad_norm']:.3f}")
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"mem {r['peak_mem_bytes'] / 2**30:.2f} GiB")
    if "loss_scale" in r:
        parts.append(f"scale {r['loss_scale']:g}")
    if r.get("skipped"):
        parts.append(f"skipped {r['skipped']}")
    if r.get("guard_skipped"):
        parts.append(f"guard-skipped {r['guard_skipped']}")
    if "moe/aux_loss" in r:
        parts.append(f"moe lbl {r['moe/aux_loss']:.3f} z {r['moe/z_loss']:.3g} drop {100 * r['moe/dropped_frac']:.1f}%")
    if "elapsed_s" in r:
        parts.append(f"elapsed {duration(r['elapsed_s'])} | eta {duration(r['eta_s'])}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on; ``?`` when unknown (nan)."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Console:
    """Log lines and an optional tqdm progress bar that the lines print above."""

    def __init__(self, total: int, start: int, show_bar: bool, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        if enabled and show_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, leave=False)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
