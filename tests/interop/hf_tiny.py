"""What the transformers interop tests share: tiny Llama-family model keys, random transformers models, and the
two comparisons every architecture is held to (logits within 1e-4, batched greedy generation token for token).

Importing it skips the importing test module where transformers is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neox.data.tokenizers import build_tokenizer
from neox.infer.generate import generate
from neox.interop.hf import export_model
from neox.interop.hf_tokenizer import export_tokenizer
from tests.infer.tiny import tiny_config

transformers = pytest.importorskip("transformers")

# neox model keys that make a Llama: RMSNorm, SwiGLU, grouped-query attention, no biases, untied output
LLAMA_LIKE = dict(
    norm="rmsnorm",
    activation="swiglu",
    num_kv_heads=2,
    use_bias_in_attn_linear=False,
    use_bias_in_mlp=False,
    use_bias_in_norms=False,
    no_weight_tying=True,
)
# transformers config fields of the same size as tests.infer.tiny's TINY model
HF_TINY = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
PROMPTS = [[5, 6, 7, 8, 9], [70, 71]]  # different lengths: the batch is left-padded


def random_ids(batch: int, length: int, seed: int, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_gap(model, hf, ids: torch.Tensor) -> float:
    """The largest absolute difference between neox's and transformers' logits on `ids`."""
    with torch.no_grad():
        return (model(ids) - hf(ids).logits).abs().max().item()


def load_hf(path: Path):
    """An exported directory as transformers loads it (fp32, eval mode)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def export_and_load(cfg, model, out: Path, tok=None):
    """Export `model` (with `tok`, or the config's tokenizer) to `out` and load it back in transformers."""
    export_model(cfg, model.state_dict(), tok if tok is not None else build_tokenizer(cfg.tokenizer), out)
    return load_hf(out)


def random_hf(model_class, conf, seed: int = 0, scale: float = 0.05):
    """A transformers model with every weight perturbed (norms included), so that mapping mistakes show."""
    torch.manual_seed(seed)
    hf = model_class(conf).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * scale)
    return hf


def save_hf(hf, path: Path) -> Path:
    """A transformers checkpoint directory with the tiny models' byte-level tokenizer beside it."""
    hf.save_pretrained(path)
    export_tokenizer(build_tokenizer(tiny_config().tokenizer), path)
    return path


def assert_greedy_matches_hf(model, hf, tok, prompts=PROMPTS, new_tokens: int = 8) -> None:
    """neox's batched greedy generation equals transformers' on the same left-padded batch, both stopping at the
    exported eos (the EOD token)."""
    ours = generate(model, prompts, new_tokens, eod_id=tok.eod_id).tokens
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    for row, theirs in zip(ours, out[:, width:].tolist(), strict=True):
        theirs = theirs[: theirs.index(tok.eod_id)] if tok.eod_id in theirs else theirs
        assert row == theirs
