"""Export a neox checkpoint as a transformers model directory, and import one as a neox checkpoint.

Export writes config.json, model.safetensors and the tokenizer files, so that
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` work offline.
Import writes a run directory in the trainer's own layout (OUT/latest, OUT/iter_0000000/ with DCP shards and
config.yml) plus OUT/neox.yml, a config to continue pre-training or fine-tune from it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml

from neox.config import from_dict, to_dict
from neox.config.loader import resolve as resolve_config
from neox.config.yaml_io import read_config_file
from neox.data.tokenizers import build_tokenizer
from neox.errors import ConfigError, NeoxError, ensure_dir
from neox.infer.api import build_model, build_tokenizer_for, checkpoint_config
from neox.interop.hf_mapping import (
    from_hf_config,
    from_hf_state_dict,
    hf_architecture,
    legacy_config_keys,
    to_hf_config,
    to_hf_state_dict,
)
from neox.interop.hf_tokenizer import (
    copy_tokenizer,
    declared_special_tokens,
    export_tokenizer,
    find_tokenizer,
    hf_tokenizer_object,
)
from neox.kernels.device import dtype_name, torch_dtype
from neox.model import GPT
from neox.model.info import max_positions
from neox.train.checkpoint import LATEST, list_checkpoints, resolve, save


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise NeoxError("Hugging Face interop needs transformers: pip install 'neox[hf]'") from e
    return transformers


# -- export --------------------------------------------------------------------------------------------------

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
_SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as transformers reads them
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def parse_shard_size(size: str | int) -> int:
    """Bytes of a --max-shard-size value: an integer byte count or a number with KB / MB / GB / TB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", str(size), re.IGNORECASE)
    value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]) if m else 0
    if value < 1:
        raise NeoxError(f"--max-shard-size {size!r}: give a size such as 2GB, 500MB or a byte count")
    return value


def save_weights(
    sd: dict[str, torch.Tensor], out: Path, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
) -> list[str]:
    """Write model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json when the
    weights exceed max_shard_size (split as transformers splits: in key order, a tensor never divided).
    Weight files of an earlier export to `out` are removed first, so the loader cannot mix old and new."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        sd, filename_pattern="model{suffix}.safetensors", max_shard_size=parse_shard_size(max_shard_size)
    )
    for old in [out / WEIGHTS, out / INDEX, *(f for f in out.glob("model-*.safetensors") if _SHARD.fullmatch(f.name))]:
        old.unlink(missing_ok=True)
    for name, keys in split.filename_to_tensors.items():
        save_file({k: sd[k].cpu().contiguous() for k in keys}, str(out / name), metadata={"format": "pt"})
        # safetensors creates its files 0600; give them the mode every other file here gets (the umask's)
        os.chmod(out / name, 0o666 & ~_umask())
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return sorted(split.filename_to_tensors)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_model(
    cfg,
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    out: str | Path,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write an HF model directory for a neox Config + GPT state dict (+ tokenizer, unless None): config.json
    and generation_config.json that transformers 4.x and 5.x both read, the weights, the tokenizer files."""
    transformers = _transformers()
    hf_architecture(cfg.model)  # refuse before writing anything
    parse_shard_size(max_shard_size)
    hf_tok = hf_tokenizer_object(tokenizer) if tokenizer is not None else None
    out = Path(out)
    ensure_dir(out, "OUT")
    sd = to_hf_state_dict(cfg.model, state_dict)
    if dtype is not None:
        cast = torch_dtype(dtype, "--dtype")
        sd = {k: v.to(cast) if v.is_floating_point() else v for k, v in sd.items()}
    weights_dtype = dtype_name(next(iter(sd.values())).dtype)
    eod = pad = None
    if tokenizer is not None:
        eod, pad = tokenizer.eod_id, tokenizer.pad_id
    hf_cfg = to_hf_config(cfg.model, eos_id=eod, bos_id=eod, pad_id=pad, dtype=weights_dtype)
    hf_cfg.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.update(legacy_config_keys(cfg.model, weights_dtype))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # generate() with no length given runs to the context length (not transformers' 20 tokens), stops at the EOD
    # token, and pads batches with the pad token
    generation = transformers.GenerationConfig(
        bos_token_id=eod, eos_token_id=eod, pad_token_id=pad, max_length=max_positions(cfg.model)
    )
    generation.save_pretrained(str(out))
    save_weights(sd, out, max_shard_size)
    if tokenizer is not None:
        export_tokenizer(tokenizer, out, hf_tok, max_length=max_positions(cfg.model))
    return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str | None = None,
    with_tokenizer: bool = True,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    ckpt = resolve(checkpoint)
    cfg = checkpoint_config(ckpt)
    hf_architecture(cfg.model)  # a config error is reported before the weights are read
    parse_shard_size(max_shard_size)
    tokenizer = build_tokenizer_for(cfg, ckpt) if with_tokenizer else None
    ensure_dir(out, "OUT")
    model = build_model(cfg, ckpt)
    return export_model(cfg, model.state_dict(), tokenizer, out, dtype, max_shard_size)


# -- import --------------------------------------------------------------------------------------------------


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF model directory: the files its *.index.json lists when it has one (sharded),
    else every *.safetensors, else pytorch_model*.bin."""
    from safetensors.torch import load_file

    for index_name, loader in (
        (INDEX, lambda f: load_file(str(f))),
        ("pytorch_model.bin.index.json", lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ):
        index = model_dir / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise NeoxError(f"{index}: not a weight index (needs a weight_map: {e})") from None
            missing = [n for n in names if not (model_dir / n).is_file()]
            if missing:
                raise NeoxError(f"{index}: lists {missing[0]}, which is not in {model_dir}; download every shard")
            return _merged(loader(model_dir / n) for n in names)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return _merged(load_file(str(f)) for f in files)
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise NeoxError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights found")
    return _merged(torch.load(f, map_location="cpu", weights_only=True) for f in files)


def _merged(parts) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for part in parts:
        sd.update(part)
    return sd


def _read_hf_config(model_dir: Path):
    """The transformers config object of a local model directory (one-line errors for a missing/bad config.json)."""
    transformers = _transformers()
    if not (model_dir / "config.json").is_file():
        raise NeoxError(f"{model_dir}: no config.json; pass a local transformers model directory")
    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, OSError) as e:  # no/unknown model_type, or config.json is not JSON
        raise NeoxError(
            f"{model_dir / 'config.json'}: not a transformers model config ({str(e).splitlines()[0]}); "
            "pass a local GPTNeoXForCausalLM or LlamaForCausalLM directory"
        ) from None


def _tokenizer_group(model_dir: Path, eod_token: str | None = None, pad_token: str | None = None) -> dict:
    """The tokenizer config group for the directory's tokenizer files and the special tokens it declares
    (eod_token / pad_token, when given, win)."""
    group = find_tokenizer(model_dir)
    given = {k: v for k, v in (("eod_token", eod_token), ("pad_token", pad_token)) if v is not None}
    group.update({**declared_special_tokens(model_dir, group), **given})
    return group


def _hf_gpt(cfg, model_dir: Path) -> GPT:
    """A GPT for cfg.model holding the directory's weights in fp32 (as the trainer keeps master weights)."""
    sd = from_hf_state_dict(cfg.model, read_hf_weights(model_dir))
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = GPT(cfg.model)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise NeoxError(
            f"{model_dir}: weights do not match its config.json (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return model.float()  # the derived position tables were built on the CPU and are rebuilt here


def is_hf_model_dir(path: str | Path) -> bool:
    """A transformers model directory (config.json) that is not also a neox run or checkpoint directory."""
    p = Path(path)
    return (p / "config.json").is_file() and not (
        (p / LATEST).exists() or (p / ".metadata").exists() or list_checkpoints(p)
    )


def hf_config(model_dir: str | Path, extra_configs: Iterable[str] = (), overrides: Iterable[str] = ()):
    """The neox Config of a local GPTNeoXForCausalLM / LlamaForCausalLM directory (model from config.json,
    tokenizer from its files), with extra config files and `--set` overrides on top. Nothing is written."""
    model_dir = Path(model_dir)
    model_group = from_hf_config(_read_hf_config(model_dir))
    base = {"model": model_group, "tokenizer": _tokenizer_group(model_dir)}
    extra = [(read_config_file(p), p) for p in extra_configs]
    return resolve_config(dicts=[(base, str(model_dir / "config.json")), *extra], overrides=overrides).config


def load_hf_model(cfg, model_dir: str | Path, device="cpu", dtype=None) -> GPT:
    """The directory's weights as a neox GPT (for `hf_config(model_dir)`), converted in memory, in eval mode."""
    model = _hf_gpt(cfg, Path(model_dir))
    dtype = torch_dtype(dtype)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()


def import_hf(
    model_dir: str | Path, out: str | Path, eod_token: str | None = None, pad_token: str | None = None
) -> Path:
    """Turn a local GPTNeoXForCausalLM / LlamaForCausalLM directory into a neox run directory.

    The tokenizer's end-of-sequence and padding tokens are those the directory declares (tokenizer_config.json,
    special_tokens_map.json, config.json), unless eod_token / pad_token are given.
    """
    model_dir, out = Path(model_dir), Path(out)
    hf_cfg = _read_hf_config(model_dir)
    model_group = from_hf_config(hf_cfg)
    if (out / "latest").exists() or any(out.glob("iter_*")):
        # writing here would move the run's `latest` to the imported weights: a resume would silently switch
        raise NeoxError(f"OUT {out} already holds checkpoints; import into a new directory")
    created = not out.exists()
    ensure_dir(out, "OUT")
    try:  # the tokenizer must load (with its end token) before anything is written
        tok_group = _tokenizer_group(model_dir, eod_token, pad_token)
        try:
            build_tokenizer(from_dict({"tokenizer": tok_group}).tokenizer)
        except ConfigError as e:
            raise NeoxError(f"{model_dir}: {e} (import: pass --eod-token / --pad-token)") from None
    except NeoxError:
        if created:
            out.rmdir()
        raise
    nested = {
        "model": model_group,
        "tokenizer": copy_tokenizer(tok_group, out),
        "checkpoint": {"save": str(out.resolve()), "load": str(out.resolve()), "finetune": True},
    }
    cfg = from_dict(nested, source=str(model_dir / "config.json"))
    model = _hf_gpt(cfg, model_dir)
    optimizer = torch.optim.AdamW(model.parameters())  # empty state: the layout the trainer writes and reads
    save(out, 0, model, optimizer, {"iteration": 0, "consumed_samples": 0}, to_dict(cfg))
    (out / "neox.yml").write_text(
        f"# Imported from {model_dir.resolve()} ({hf_cfg.architectures[0] if hf_cfg.architectures else ''}).\n"
        "# Add data paths and training settings, then: neox train THIS_FILE\n"
        + yaml.safe_dump(
            {k: v for k, v in to_dict(cfg).items() if k in ("model", "tokenizer", "checkpoint")}, sort_keys=False
        )
    )
    return out
