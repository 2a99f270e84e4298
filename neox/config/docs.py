"""docs/config.md, generated from the schema's `help` metadata and the GPT-NeoX key tables in aliases.py.

`neox config docs` rewrites the file; a test fails when the committed file is out of date.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from neox.config import aliases
from neox.config.fields import GROUPS, field_types
from neox.config.loader import FLAT

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"

INTRO = """\
# Config reference

Generated from `neox/config/schema.py` and `neox/config/aliases.py` by `neox config docs`; do not edit by hand.

## How configs load

- `neox train a.yml b.yml` reads YAML or JSON files (GPT-NeoX's `{ "key": value, ... }` flow mappings with `#`
  comments included) and merges them in order: a later file overrides an earlier one key by key.
  `-d DIR` prefixes relative file names with `DIR` (like GPT-NeoX's `deepy.py -d configs`).
- `--set KEY=VALUE` overrides after all files; the value is read as YAML (`--set model.hidden_size=128`,
  `--set hidden-size=128`, `--set 'optimizer.betas=[0.9, 0.99]'`).
- Keys can be nested by group (`model: {hidden_size: 512}`) or flat as in GPT-NeoX (`hidden_size: 512`); a
  hyphen and an underscore are the same (`num-layers` = `num_layers`). Within one file the same key twice
  (after that normalisation, flat or nested) is an error.
- Every GPT-NeoX key is either mapped to a field below, accepted with no effect (with the reason),
  accepted only at its "off" value, or rejected with the reason; an unknown key is an error with a
  "did you mean" suggestion. `neox config show` prints the merged config and the keys that had no effect.
- Derived at load: `max_position_embeddings` = `seq_length`, `num_kv_heads` = `num_attention_heads`,
  `intermediate_size` (see its row). The batch triple (`train_batch_size` = micro * accumulation *
  data-parallel size) is resolved by the trainer from any two of them; the padded vocabulary from the tokenizer.
- Structured GPT-NeoX keys: `optimizer: {type, params: {lr, betas, eps, weight_decay}}`, `fp16: {enabled,
  loss_scale, initial_scale_power, loss_scale_window, hysteresis, min_loss_scale}`, `bf16: {enabled}`,
  `precision: bfloat16|float16|float32`, `zero_optimization: {stage, cpu_offload, offload_optimizer, ...}`
  (DeepSpeed bucket/overlap tuning has no effect), `attention_config: [[["local", "global"], "all"]]` or
  `[[["global"], N], ...]` (expanded into `attention_types`, one per layer; `flash` is global), `mlp_type: llama`
  (gated form of `activation`).
- Defaults are neox's own, not GPT-NeoX's: a GPT-NeoX config that relies on GPT-NeoX defaults should state
  them (GPT-NeoX defaults `pos_emb: learned`, `lr_decay_style: linear`, `weight_decay: 0.1`,
  `log_interval: 100`, `eval_iters: 100`, `pipe_parallel_size: 0`, `tokenizer_type: GPT2BPETokenizer`).
"""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null" if len(args) == 1 else "any"
    return getattr(tp, "__name__", str(tp))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


def _aliases_of(group: str, name: str) -> list[str]:
    out = []
    if FLAT.get(name) == (group, name):
        out.append(f"`{name}`")
    out += [f"`{k}`" for k, t in sorted(aliases.RENAMES.items()) if t == (group, name)]
    out += [f"`{k}`" for k in aliases.HANDLER_DOCS.get((group, name), [])]
    renames = aliases.VALUE_RENAMES.get((group, name))
    if renames:
        out.append("values " + ", ".join(f"{_show(a)}→{_show(b)}" for a, b in renames.items()))
    return out


def group_table(group: str) -> list[str]:
    types = field_types(group)
    lines = [
        f"## `{group}`",
        "",
        "| key | type | default | choices | help | GPT-NeoX / flat keys |",
        "|---|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(GROUPS[group]):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = f.metadata.get("choices")
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{group}.{f.name}`",
                    _type_name(types[f.name]),
                    _cell(_show(default)),
                    _cell(", ".join(_show(c) for c in choices)) if choices else "",
                    _cell(f.metadata.get("help", "")),
                    _cell(", ".join(_aliases_of(group, f.name))),
                ]
            )
            + " |"
        )
    return lines + [""]


def render() -> str:
    parts = [INTRO]
    for g in GROUPS:
        parts.append("\n".join(group_table(g)))
    parts.append("## GPT-NeoX keys accepted without effect\n\n| key | why it changes nothing here |\n|---|---|")
    no_effect = {**aliases.NO_EFFECT, **{f"{g}.{k}": v for (g, k), v in aliases.GROUP_NO_EFFECT.items()}}
    parts.append("\n".join(f"| `{k}` | {_cell(v)} |" for k, v in sorted(no_effect.items())) + "\n")
    parts.append("## GPT-NeoX keys accepted only when off\n\n| key | accepted values | otherwise |\n|---|---|---|")
    parts.append(
        "\n".join(
            f"| `{k}` | {_cell(', '.join(_show(a) for a in allowed))} | {_cell(why)} |"
            for k, (allowed, why) in sorted(aliases.ONLY_DEFAULT.items())
        )
        + "\n"
    )
    parts.append("## GPT-NeoX keys rejected\n\n| key | reason |\n|---|---|")
    parts.append("\n".join(f"| `{k}` | {_cell(v)} |" for k, v in sorted(aliases.REJECTED.items())) + "\n")
    parts.append("## Values rejected\n\n| key | value | reason |\n|---|---|---|")
    parts.append(
        "\n".join(
            f"| `{g}.{n}` | `{v}` | {_cell(why)} |"
            for (g, n), table in aliases.REJECTED_VALUES.items()
            for v, why in table.items()
        )
        + "\n"
    )
    return "\n".join(parts)


def write(path: Path = DOC_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path
