"""muP coordinate check: activation scale of each layer's output against model width over the first steps.

The same model is trained at several widths (hidden_size; heads kept, so head_dim grows) for a few steps on
fixed random token batches, once with muP and once in standard parametrisation (SP), at the config's learning
rate held constant. Under muP the mean |x| of every layer output stays flat across widths at every step; in
SP it grows with width once the updates count (Yang et al., Tensor Programs V, section 5 / Figure 5).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from neox.config.schema import Config, ModelConfig
from neox.config.shapes import default_intermediate_size, intermediate_size
from neox.errors import NeoxError
from neox.model import GPT
from neox.train.loss import masked_mean_loss
from neox.train.optim import build_optimizer

try:  # an optional extra: the command says how to install it instead of failing at import
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window or needs a display
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

PLOT_EXTRA = "neox mup coord-check needs matplotlib for its PNG: pip install 'neox[plot]'"


def width_config(m: ModelConfig, width: int, use_mup: bool) -> ModelConfig:
    """`m` at hidden_size `width`; the config's own width (or its mup_base_hidden_size) stays the muP base."""
    if width % m.num_attention_heads:
        raise NeoxError(f"--widths: {width} is not divisible by num_attention_heads {m.num_attention_heads}")
    base = m.mup_base_hidden_size or m.hidden_size
    follows_rule = intermediate_size(m) == default_intermediate_size(m)
    scaled = dataclasses.replace(m, hidden_size=width, intermediate_size=None)
    inter = (
        default_intermediate_size(scaled)
        if follows_rule
        else max(1, round(intermediate_size(m) * width / m.hidden_size))
    )
    if not use_mup:
        return dataclasses.replace(
            scaled,
            intermediate_size=inter,
            use_mup=False,
            mup_base_hidden_size=None,
            mup_base_num_attention_heads=None,
            mup_base_intermediate_size=None,
            mup_init_scale=1.0,
            mup_attn_temp=1.0,
            mup_output_temp=1.0,
            mup_embedding_mult=1.0,
        )
    return dataclasses.replace(scaled, intermediate_size=inter, use_mup=True, mup_base_hidden_size=base)


def layer_names(m: ModelConfig) -> list[str]:
    return ["embedding", *(f"layer.{i}" for i in range(m.num_layers)), "logits"]


def _watch(model: GPT, record: dict[str, float]) -> list:
    """Hooks writing mean |output| of the embedding (after its muP multiplier), each block and the logits."""

    def keep(name):
        def hook(_module, _inputs, out):
            record[name] = out.detach().abs().mean().item()

        return hook

    handles = [model.embed_dropout.register_forward_hook(keep("embedding"))]
    for i, block in model.layers.items():
        handles.append(block.register_forward_hook(keep(f"layer.{i}")))
    handles.append(model.register_forward_hook(keep("logits")))
    return handles


def run_width(cfg: Config, mcfg: ModelConfig, steps: int, batches: list[torch.Tensor], seed: int) -> list[dict]:
    """Per step, mean |x| of each layer output in that step's forward (before its update)."""
    torch.manual_seed(seed)
    model = GPT(mcfg).train()
    optimizer = build_optimizer(model, cfg.optimizer, mcfg)
    for group in optimizer.param_groups:
        group["lr"] = cfg.optimizer.lr * group["lr_scale"]
    out = []
    for step in range(steps):
        record: dict[str, float] = {}
        handles = _watch(model, record)
        tokens = batches[step % len(batches)]
        logits = model(tokens[:, :-1])
        for h in handles:
            h.remove()
        labels = tokens[:, 1:]
        loss = masked_mean_loss(logits, labels, torch.ones_like(labels, dtype=torch.float32))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        out.append({**record, "loss": loss.item()})
    return out


def coord_check(
    cfg: Config, widths: list[int], steps: int, batch_size: int = 4, seq_length: int | None = None, seed: int = 1234
) -> dict:
    """{"widths", "layers", "steps", "mup": {layer: [[mean |x| per width] per step]}, "sp": same,
    "slopes": {mode: {layer: slope of log mean|x| against log width at the last step}}}."""
    m = cfg.model
    if m.vocab_size is None:
        raise NeoxError("model.vocab_size is unset; coord-check needs the (padded) vocabulary size")
    seq = seq_length or min(m.seq_length, 64)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, m.vocab_size, (batch_size, seq + 1), generator=g) for _ in range(steps)]
    result: dict = {"widths": list(widths), "layers": layer_names(m), "steps": steps, "lr": cfg.optimizer.lr}
    for mode in ("mup", "sp"):
        per_width = [run_width(cfg, width_config(m, w, mode == "mup"), steps, batches, seed) for w in widths]
        result[mode] = {
            name: [[per_width[j][s][name] for j in range(len(widths))] for s in range(steps)]
            for name in [*result["layers"], "loss"]
        }
    result["slopes"] = {
        mode: {name: log_slope(widths, result[mode][name][-1]) for name in result["layers"]} for mode in ("mup", "sp")
    }
    return result


def log_slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(width): 0 = flat, 1 = proportional to width."""
    xs = [math.log(w) for w in widths]
    ys = [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def plot_coord_check(result: dict, out: str | Path, max_panels: int = 5) -> Path:
    """A grid of panels: muP above, SP below, one column per step shown (at most max_panels, spread over the
    steps); in each, mean |x| of every layer output against width, both axes logarithmic."""
    if plt is None:
        raise NeoxError(PLOT_EXTRA)
    steps = result["steps"]
    shown = sorted({round(i * (steps - 1) / max(1, max_panels - 1)) for i in range(min(steps, max_panels))})
    fig, axes = plt.subplots(2, len(shown), figsize=(3.4 * len(shown), 6.4), squeeze=False, sharey="row")
    for row, (mode, title) in enumerate((("mup", "muP"), ("sp", "standard"))):
        for col, step in enumerate(shown):
            ax = axes[row][col]
            for name in result["layers"]:
                ax.plot(result["widths"], result[mode][name][step], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{title}, step {step}")
            ax.set_xlabel("width (hidden_size)")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("mean |x| of layer output")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(out)
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise NeoxError(f"{out}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out
