"""`neox.load(checkpoint) -> (model, tokenizer)`: a trained checkpoint as a ready single-process model.

CHECKPOINT is a run's save directory (its `latest` checkpoint is used) or one checkpoint directory in it
(the one holding config.yml). DCP checkpoints load into one process whatever layout they were saved with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch

from neox.config import load as load_config
from neox.data.tokenizers import build_tokenizer
from neox.errors import NeoxError
from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from neox.infer.tensor_parallel import shard_model
from neox.kernels.device import torch_dtype
from neox.model import GPT
from neox.model.lora import apply_lora, is_adapter_key, merge_lora_
from neox.model.qlora import dequantize_base_, quantize_base_
from neox.train.checkpoint import load_model_weights, resolve


def checkpoint_config(ckpt: Path, extra_configs: Iterable[str] = (), overrides: Iterable[str] = ()):
    """The checkpoint's resolved config, with optional extra YAML files and `--set` overrides applied on top."""
    return load_config([str(ckpt / "config.yml"), *extra_configs], list(overrides))


def build_model(cfg, ckpt: Path | None, device="cpu", dtype=None):
    """GPT for cfg.model with the checkpoint's weights (random init when ckpt is None), in eval mode."""
    model = GPT(cfg.model)
    lo = cfg.lora
    if lo.rank:  # a LoRA run's checkpoint: its adapters are loaded, then folded into the weights
        apply_lora(model, lo.rank, lo.alpha, lo.dropout, lo.target_modules)
        if lo.quantize != "none":  # QLoRA: the checkpoint holds 4-bit base weights, merged dequantised
            quantize_base_(model, lo.quantize, lo.double_quant, lo.quantize_all)
    if ckpt is not None:
        load_model_weights(str(ckpt), model, optional=is_adapter_key if lo.rank else None)
    dequantize_base_(model)
    merge_lora_(model)
    dtype = torch_dtype(dtype)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()


def build_model_for(cfg, ckpt: Path | None, device="cpu", dtype=None, mesh=None):
    """build_model, or with a mesh (neox.infer.tensor_parallel.init_inference) this rank's tensor-parallel
    shard of it: the GPT is sharded first and each rank reads only its slices of the checkpoint."""
    if mesh is None:
        return build_model(cfg, ckpt, device, dtype)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.rank:
        # adapters are folded into whole weights first (build_model), then the merged model is sharded
        model = shard_model(build_model(cfg, ckpt, "cpu"), mesh, device)
    else:
        model = shard_model(GPT(cfg.model), mesh, device)
        if ckpt is not None:
            load_model_weights(str(ckpt), model)
    dtype = torch_dtype(dtype)
    return (model.to(dtype=dtype) if dtype else model).eval()


def build_tokenizer_for(cfg, ckpt: Path | None = None):
    """The config's tokenizer; relative tokenizer files are also looked up beside the checkpoint and run dir."""
    tcfg = cfg.tokenizer
    fixes = {}
    for key in ("vocab_file", "merge_file"):
        value = getattr(tcfg, key)
        if value and not Path(value).exists() and ckpt is not None:
            for base in (ckpt, ckpt.parent):
                if (base / value).exists():
                    fixes[key] = str(base / value)
                    break
            else:
                raise NeoxError(
                    f"{ckpt / 'config.yml'}: tokenizer.{key}={value!r} not found (relative paths resolve "
                    "against the working directory); run from the training directory or use "
                    f"--set tokenizer.{key}=PATH"
                )
    return build_tokenizer(dataclasses.replace(tcfg, **fixes) if fixes else tcfg)


class LoadedModel:
    """A loaded GPT plus its tokenizer and config; attribute access falls through to the GPT, and
    `generate(...)` takes text (or token ids) and returns text."""

    def __init__(self, module, tokenizer, cfg):
        self.module, self.tokenizer, self.cfg = module, tokenizer, cfg

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def generate(
        self,
        prompt: str | list[str] | list[int] | list[list[int]] = "",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_strings: list[str] | None = None,
        seed: int | None = None,
        recompute: bool | None = None,
        stop_at_eod: bool = True,
        compile: bool | None = None,
    ):
        """Text in, text out (a str prompt gives a str, a list a list); token-id prompts give token-id lists.

        Unset arguments come from the checkpoint's `generation` config group.
        """
        g = self.cfg.generation
        pick = lambda v, d: d if v is None else v  # noqa: E731
        params = SamplingParams(
            temperature=pick(temperature, g.temperature),
            top_k=pick(top_k, g.top_k),
            top_p=pick(top_p, g.top_p),
            repetition_penalty=pick(repetition_penalty, g.repetition_penalty),
        )
        single = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], int))
        prompts = [prompt] if single else list(prompt)
        as_text = isinstance(prompts[0], str)
        ids = [self.encode_prompt(p) if as_text else list(p) for p in prompts]
        gen = torch.Generator(device=next(self.module.parameters()).device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        result = generate(
            self.module,
            ids,
            max_new_tokens=pick(max_new_tokens, g.maximum_tokens),
            params=params,
            eod_id=self.tokenizer.eod_id if stop_at_eod else None,
            stop_strings=pick(stop_strings, g.stop_strings),
            decode=self.tokenizer.decode,
            generator=gen,
            recompute=pick(recompute, g.recompute),
            compile=pick(compile, g.compile_decode),
        )
        outs = result.texts if as_text else result.tokens
        return outs[0] if single else outs

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids; an empty prompt starts from the end-of-document token, as unconditional sampling does."""
        return list(self.tokenizer.encode(text)) if text else [self.tokenizer.eod_id]


def load(checkpoint: str | Path, device="cpu", dtype=None) -> tuple[LoadedModel, object]:
    ckpt = resolve(checkpoint)
    cfg = checkpoint_config(ckpt)
    tokenizer = build_tokenizer_for(cfg, ckpt)
    return LoadedModel(build_model(cfg, ckpt, device, dtype), tokenizer, cfg), tokenizer
