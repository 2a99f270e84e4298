"""Export a neox checkpoint as a transformers model directory, and import one as a neox checkpoint.

Export writes config.json, model.safetensors and the tokenizer files, so that
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` work offline.
Import writes a run directory in the trainer's own layout (OUT/latest, OUT/iter_0000000/ with DCP shards and
config.yml) plus OUT/neox.yml, a config to continue pre-training or fine-tune from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from neox.errors import NeoxError, ensure_dir
from neox.interop.hf_mapping import from_hf_config, from_hf_state_dict, hf_architecture, to_hf_config, to_hf_state_dict

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise NeoxError("Hugging Face interop needs transformers: pip install 'neox[hf]'") from e
    return transformers


# -- tokenizer -----------------------------------------------------------------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of byte-level BPE vocabularies):
    printable Latin-1 bytes map to themselves, the rest to code points from 256 upward in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_hf_tokenizer(eod: str, pad: str):
    """A tokenizers.Tokenizer giving neox ByteLevelTokenizer's ids: byte b -> id b, then eod, pad."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eod, special=True), AddedToken(pad, special=True)])
    return tok


def hf_tokenizer_object(tokenizer):
    """The `tokenizers.Tokenizer` equivalent of a neox tokenizer, or a NeoxError naming the type."""
    from neox.data.tokenizers import EOD_TOKEN, PAD_TOKEN

    inner = getattr(tokenizer, "_tok", None)  # HFTokenizer / GPT2BPETokenizer wrap a tokenizers.Tokenizer
    if inner is not None:
        return inner
    if tokenizer.name == "ByteLevelTokenizer":
        return _byte_level_hf_tokenizer(EOD_TOKEN, PAD_TOKEN)
    raise NeoxError(f"tokenizer.tokenizer_type={tokenizer.name} has no Hugging Face tokenizer equivalent; "
                    "export with --no-tokenizer and supply a tokenizer yourself")


def export_tokenizer(tokenizer, out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json so AutoTokenizer.from_pretrained(out) works."""
    from transformers import PreTrainedTokenizerFast

    obj = hf_tokenizer_object(tokenizer)
    eod = obj.id_to_token(tokenizer.eod_id)
    pad = obj.id_to_token(tokenizer.pad_id)
    # neox's byte-level tokenizer reads "<|endoftext|>" in text as plain bytes; HF-JSON tokenizers match it
    literal = getattr(tokenizer, "_tok", None) is None
    fast = PreTrainedTokenizerFast(tokenizer_object=obj, bos_token=eod, eos_token=eod, unk_token=eod,
                                   pad_token=pad, split_special_tokens=literal)
    fast.save_pretrained(str(out))


# -- export --------------------------------------------------------------------------------------------------

def export_model(cfg, state_dict: dict[str, torch.Tensor], tokenizer, out: str | Path,
                 dtype: str | None = None) -> Path:
    """Write an HF model directory for a neox Config + GPT state dict (+ tokenizer, unless None)."""
    _transformers()
    from safetensors.torch import save_file

    hf_architecture(cfg.model)  # refuse before writing anything
    if tokenizer is not None:
        hf_tokenizer_object(tokenizer)
    out = Path(out)
    ensure_dir(out, "OUT")
    sd = to_hf_state_dict(cfg.model, state_dict)
    if dtype is not None:
        if dtype not in TORCH_DTYPES:
            raise NeoxError(f"--dtype {dtype!r}: use one of {sorted(TORCH_DTYPES)}")
        sd = {k: v.to(TORCH_DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    dtype_name = {v: k for k, v in TORCH_DTYPES.items()}[next(iter(sd.values())).dtype]
    eod = pad = None
    if tokenizer is not None:
        eod, pad = tokenizer.eod_id, tokenizer.pad_id
    hf_cfg = to_hf_config(cfg.model, eos_id=eod, bos_id=eod, pad_id=pad, dtype=dtype_name)
    hf_cfg.save_pretrained(str(out))
    save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        export_tokenizer(tokenizer, out)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str | None = None,
                      with_tokenizer: bool = True) -> Path:
    from neox.infer.api import build_model, build_tokenizer_for, checkpoint_config
    from neox.train.checkpoint import resolve

    ckpt = resolve(checkpoint)
    cfg = checkpoint_config(ckpt)
    hf_architecture(cfg.model)  # a config error is reported before the weights are read
    tokenizer = build_tokenizer_for(cfg, ckpt) if with_tokenizer else None
    ensure_dir(out, "OUT")
    model = build_model(cfg, ckpt)
    return export_model(cfg, model.state_dict(), tokenizer, out, dtype)


# -- import --------------------------------------------------------------------------------------------------

def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF model directory (safetensors, sharded or not, else pytorch_model*.bin)."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise NeoxError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights found")
    sd = {}
    for f in files:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def _import_tokenizer(model_dir: Path, out: Path) -> dict:
    """Copy the tokenizer next to the checkpoint; returns the tokenizer config group for it."""
    if (model_dir / "tokenizer.json").is_file():
        shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")
        return {"tokenizer_type": "HFTokenizer", "vocab_file": str((out / "tokenizer.json").resolve())}
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(model_dir / name, out / name)
        return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str((out / "vocab.json").resolve()),
                "merge_file": str((out / "merges.txt").resolve())}
    if (model_dir / "tokenizer.model").is_file():
        shutil.copy(model_dir / "tokenizer.model", out / "tokenizer.model")
        return {"tokenizer_type": "SPMTokenizer", "vocab_file": str((out / "tokenizer.model").resolve())}
    raise NeoxError(f"{model_dir}: no tokenizer.json, vocab.json+merges.txt or tokenizer.model to import")


def import_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Turn a local GPTNeoXForCausalLM / LlamaForCausalLM directory into a neox run directory."""
    import yaml

    from neox.config import from_dict, to_dict
    from neox.model import GPT
    from neox.train.checkpoint import save

    transformers = _transformers()
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise NeoxError(f"{model_dir}: no config.json; pass a local transformers model directory")
    try:
        hf_cfg = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, OSError) as e:  # no/unknown model_type, or config.json is not JSON
        raise NeoxError(f"{model_dir / 'config.json'}: not a transformers model config ({str(e).splitlines()[0]}); "
                        "pass a local GPTNeoXForCausalLM or LlamaForCausalLM directory") from None
    model_group = from_hf_config(hf_cfg)
    if (out / "latest").exists() or any(out.glob("iter_*")):
        # writing here would move the run's `latest` to the imported weights: a resume would silently switch
        raise NeoxError(f"OUT {out} already holds checkpoints; import into a new directory")
    ensure_dir(out, "OUT")
    nested = {"model": model_group, "tokenizer": _import_tokenizer(model_dir, out),
              "checkpoint": {"save": str(out.resolve()), "load": str(out.resolve()), "finetune": True}}
    cfg = from_dict(nested, source=str(model_dir / "config.json"))

    sd = from_hf_state_dict(cfg.model, read_hf_weights(model_dir))
    with torch.device("meta"):
        model = GPT(cfg.model)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise NeoxError(f"{model_dir}: weights do not match its config.json (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")
    # fp32 master weights, as the trainer keeps them (non-persistent tables stay on meta: they are not saved)
    model = model.float()
    optimizer = torch.optim.AdamW(model.parameters())  # empty state: the layout the trainer writes and reads
    save(out, 0, model, optimizer, {"iteration": 0, "consumed_samples": 0}, to_dict(cfg))
    (out / "neox.yml").write_text(
        f"# Imported from {model_dir.resolve()} ({hf_cfg.architectures[0] if hf_cfg.architectures else ''}).\n"
        "# Add data paths and training settings, then: neox train THIS_FILE\n"
        + yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k in ("model", "tokenizer", "checkpoint")},
                         sort_keys=False))
    return out
