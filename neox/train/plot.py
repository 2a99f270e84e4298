"""`neox plot`: training curves of one or more runs, read from their metrics.jsonl, drawn to one PNG.

What people otherwise read off log lines: training and validation loss, learning rate, gradient norm and
throughput, against step or tokens, several runs overlaid with a legend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from neox.errors import NeoxError
from neox.train.metrics import METRICS_FILE

try:  # an optional extra: `neox plot` says how to install it instead of failing at import
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window or needs a display
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

# (metrics.jsonl key, panel title); val_loss comes from evaluation records, the rest from training log lines
PANELS = (
    ("loss", "training loss"),
    ("val_loss", "validation loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("tokens_per_s", "throughput (tokens/s)"),
)
X_AXES = {"step": "iteration", "tokens": "consumed_tokens"}


@dataclass
class Run:
    label: str
    path: Path
    # key -> {step: value}; a step logged twice (a run resumed from an earlier checkpoint) keeps the later value
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    tokens_at: dict[int, float] = field(default_factory=dict)  # step -> consumed tokens, from training lines


def metrics_path(run: str | Path) -> Path:
    """A run directory (holding metrics.jsonl) or a metrics file itself."""
    p = Path(run)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        raise NeoxError(f"{run}: no {METRICS_FILE} there; pass a run directory (the train `save` path) or the file")
    return p


def read_run(run: str | Path, label: str | None = None) -> tuple[Run, list[str]]:
    """Parse one run's metrics.jsonl. Returns the run and warnings (a last line cut short by a killed process
    is skipped with a warning; a damaged line elsewhere is an error naming it)."""
    path = metrics_path(run)
    out = Run(label or (path.parent.name if path.name == METRICS_FILE else path.stem), path)
    warnings: list[str] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["iteration"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                warnings.append(f"{path}:{n}: incomplete last line skipped (the run was stopped while writing it)")
                continue
            raise NeoxError(
                f"{path}:{n}: not a metrics record (JSON with an 'iteration'); fix or delete the line"
            ) from None
        if "consumed_tokens" in record:
            out.tokens_at[step] = float(record["consumed_tokens"])
        for key, _ in PANELS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out.series.setdefault(key, {})[step] = float(value)
    if not out.series:
        raise NeoxError(f"{path}: no loss, learning-rate or throughput records to plot yet")
    return out, warnings


def _tokens(run: Run, step: int) -> float | None:
    """Tokens consumed at `step`: logged directly, or (validation records) from the nearest logged step."""
    if step in run.tokens_at:
        return run.tokens_at[step]
    earlier = [s for s in run.tokens_at if s <= step]
    return run.tokens_at[max(earlier)] if earlier else None


def points(run: Run, key: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of one series, in step order; x is 'step' or 'tokens'."""
    xs, ys = [], []
    for step, value in sorted(run.series.get(key, {}).items()):
        pos = float(step) if x == "step" else _tokens(run, step)
        if pos is not None:
            xs.append(pos)
            ys.append(value)
    return xs, ys


def smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1 = as logged)."""
    if window <= 1:
        return ys
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: list[Run], out: str | Path, x: str = "step", smoothing: int = 1) -> Path:
    """Draw every panel that some run has data for; one line per run, the same colour in every panel."""
    if plt is None:
        raise NeoxError("neox plot needs matplotlib: pip install 'neox[plot]'")
    if x not in X_AXES:
        raise NeoxError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    panels = [(k, t) for k, t in PANELS if any(run.series.get(k) for run in runs)]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for i, run in enumerate(runs):
            xs, ys = points(run, key, x)
            if not xs:
                continue
            ys = ys if key in ("lr", "val_loss") else smooth(ys, smoothing)
            ax.plot(xs, ys, label=run.label, color=colours[i % len(colours)], marker="o" if len(xs) < 3 else None)
        ax.set_title(title)
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        ax.grid(alpha=0.3)
        if key == "grad_norm":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise NeoxError(f"{out}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out
