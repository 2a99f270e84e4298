"""The config's groups and fields, and the records that tie a field's value to the key that set it.

Shared by the loader (which fills them), the GPT-NeoX key handlers in aliases.py (which look fields up and
suggest spellings) and validate.py (whose errors name the key that set a value).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from neox.config.schema import Config

# group name -> dataclass, e.g. "model" -> ModelConfig
GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


@functools.cache
def group_fields(group: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(GROUPS[group])}


@functools.cache
def field_types(group: str) -> dict[str, Any]:
    return typing.get_type_hints(GROUPS[group])


def normalize_key(key: Any) -> Any:
    """GPT-NeoX treats `num-layers` and `num_layers` as the same key."""
    return key.strip().replace("-", "_") if isinstance(key, str) else key


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    if not close:
        return " (see docs/config.md for the keys)"
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


@dataclass
class Assignment:
    target: tuple[str, str]  # (group, field), or ("_neox", name) for values consumed while building
    value: Any
    key: str  # as the user wrote it, dotted for nested keys: "optimizer.params.lr"
    source: str
    ident: tuple  # two assignments with the same ident in one source are a duplicate key


@dataclass
class Resolved:
    config: Config
    provenance: dict[tuple[str, str], Assignment]  # which source set each field (absent: default)
    notes: list[str]

    def where(self, group: str, name: str) -> str:
        a = self.provenance.get((group, name))
        if a is None:
            return f"<defaults>: key '{group}.{name}'"
        return f"{a.source}: key '{a.key}'"
