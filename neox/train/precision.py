"""Training precision: fp32, bf16 (autocast over fp32 master weights, or pure bf16 weights), fp16 with loss scaling.

The fp16 loss scaler follows DeepSpeed's DynamicLossScaler (the one GPT-NeoX's `fp16` dict configures):
- an overflow (a non-finite gradient) skips the optimizer step; once `hysteresis` overflows have been
  tolerated the scale is halved (never below `min_loss_scale`), and each further overflow halves it again;
- after `loss_scale_window` iterations since the last overflow the scale doubles and the hysteresis budget
  is refilled.
A static `loss_scale` never changes; overflowing steps are still skipped.

TF32 (`precision.tf32`, default on) is a process-wide switch of the CUDA backends, set when training on CUDA:
on it makes fp32 matmuls several times faster at bf16-like input rounding, which is what fp32 training on a
GPU is usually meant to cost; off keeps fp32 exact. A CPU run leaves the switches as they are.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from neox.config.schema import PrecisionConfig
from neox.errors import ConfigError
from neox.kernels.bf16_cpu import bf16_matmul_mode
from neox.kernels.device import DTYPES


class LossScaler:
    """Static or dynamic loss scale with DeepSpeed's update rule (see module docstring)."""

    def __init__(self, cfg: PrecisionConfig):
        self.dynamic = cfg.loss_scale is None or cfg.loss_scale == 0
        if not self.dynamic and cfg.loss_scale < 0:
            raise ConfigError(f"precision.loss_scale must be positive or null (dynamic), got {cfg.loss_scale}")
        if cfg.hysteresis < 1 or cfg.loss_scale_window < 1:
            raise ConfigError("precision.hysteresis and precision.loss_scale_window must be >= 1")
        self.scale = float(2.0**cfg.initial_scale_power) if self.dynamic else float(cfg.loss_scale)
        self.window = int(cfg.loss_scale_window)
        self.hysteresis = int(cfg.hysteresis)
        self.min_scale = float(cfg.min_loss_scale)
        self.hysteresis_left = self.hysteresis
        self.iteration = 0
        self.last_overflow = -1

    def update(self, overflow: bool) -> None:
        """Account for one iteration's outcome."""
        if self.dynamic:
            if overflow:
                if self.hysteresis_left <= 1:
                    self.scale = max(self.scale / 2.0, self.min_scale)
                else:
                    self.hysteresis_left -= 1
                self.last_overflow = self.iteration
            elif (self.iteration - self.last_overflow) % self.window == 0:
                self.hysteresis_left = self.hysteresis
                self.scale *= 2.0
        self.iteration += 1

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "hysteresis_left": self.hysteresis_left,
            "iteration": self.iteration,
            "last_overflow": self.last_overflow,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.hysteresis_left = int(sd["hysteresis_left"])
        self.iteration = int(sd["iteration"])
        self.last_overflow = int(sd["last_overflow"])


def apply_tf32(enabled: bool, device_type: str) -> None:
    """Set the TF32 switches of cuBLAS matmuls and cuDNN for a run on `device_type` (only "cuda" is touched).

    The legacy `allow_tf32` setters are used on purpose: torch 2.9+ keeps them consistent with the newer
    `fp32_precision` getters, while setting the new API makes code reading `allow_tf32` (transformers, user
    code) raise for mixing the two."""
    if device_type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


class Precision:
    """Everything the step needs to know about numeric formats.

    - `param_dtype`: what the model's weights are stored in (bf16 only for `bf16_mode: pure`).
    - `compute_dtype`: the matmul dtype (used for the MFU peak measurement too).
    - `autocast()`: the context the forward pass runs in.
    - `scaler`: a LossScaler for fp16, else None.
    - `tf32`: whether fp32 matmuls may use TF32, applied at construction on CUDA (`apply_tf32`).
    """

    def __init__(self, cfg: PrecisionConfig, device_type: str = "cpu"):
        if cfg.precision not in ("fp32", "bf16", "fp16"):  # the config's names (DTYPES also has torch's)
            raise ConfigError(f"precision.precision: unknown {cfg.precision!r}; use fp32, bf16 or fp16")
        if cfg.bf16_mode not in ("autocast", "pure"):
            raise ConfigError(f"precision.bf16_mode: unknown {cfg.bf16_mode!r}; use autocast or pure")
        self.name = cfg.precision
        self.device_type = device_type
        self.compute_dtype = DTYPES[cfg.precision]
        self.pure = cfg.precision == "bf16" and cfg.bf16_mode == "pure"
        self.param_dtype = torch.bfloat16 if self.pure else torch.float32
        self.scaler = LossScaler(cfg) if cfg.precision == "fp16" else None
        self.tf32 = bool(cfg.tf32)
        apply_tf32(self.tf32, device_type)

    @property
    def uses_autocast(self) -> bool:
        return self.compute_dtype != torch.float32 and not self.pure

    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast weights to the storage dtype (a no-op except for pure bf16)."""
        return model.to(self.param_dtype) if self.pure else model

    @contextlib.contextmanager
    def autocast(self):
        """The context forward passes run in: autocast over fp32 weights for bf16/fp16, and on a CPU without
        bf16 arithmetic the fp32-block bf16 matmul (neox.kernels.bf16_cpu) for pure and autocast bf16."""
        with contextlib.ExitStack() as stack:
            if self.uses_autocast:
                stack.enter_context(torch.autocast(self.device_type, dtype=self.compute_dtype))
            mode = bf16_matmul_mode(self.compute_dtype, self.device_type)
            if mode is not None:
                stack.enter_context(mode)
            yield

    def label(self) -> str:
        base = f"bf16-{'pure' if self.pure else 'autocast'}" if self.name == "bf16" else self.name
        return f"{base}+tf32" if self.tf32 and self.name == "fp32" and self.device_type == "cuda" else base
