"""Turning config files, dicts and `--set` overrides into one typed, validated `Config`.

Each source (a file, a dict, one `--set`) is first flattened into assignments `(group, field) <- value`,
remembering the key as the user wrote it so that errors can name it. Sources are then merged in order (later
wins) and the result is type-checked field by field, derived defaults are filled, and cross-field rules run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Iterable
from typing import Any

from neox.config import aliases
from neox.config.fields import (
    GROUPS,
    Assignment,
    Resolved,
    did_you_mean,
    field_types,
    group_fields,
    normalize_key,
)
from neox.config.schema import Config
from neox.config.validate import derive, validate, validate_training
from neox.config.yaml_io import parse_override, read_config_file
from neox.errors import ConfigError

log = logging.getLogger(__name__)


# Every field is also accepted flat at the top level (GPT-NeoX style) when its name is unique across groups.
def _flat_index() -> dict[str, tuple[str, str]]:
    index: dict[str, tuple[str, str]] = {}
    seen_twice: set[str] = set()
    for g in GROUPS:
        for name in group_fields(g):
            if name in index:
                seen_twice.add(name)
            index[name] = (g, name)
    for name in seen_twice | aliases.NOT_FLAT:
        index.pop(name, None)
    return index


FLAT = _flat_index()


class Collector:
    """What one source assigns; handlers in aliases.py call `set` and `note`."""

    def __init__(self, source: str):
        self.source = source
        self.assignments: dict[tuple[str, str], Assignment] = {}
        self.notes: list[str] = []
        self.noted_keys: list[str] = []

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: key {key!r}: {message}")

    def set(self, target: tuple[str, str], value: Any, key: str, ident: tuple | None = None) -> None:
        ident = ident or ("field", target)
        old = self.assignments.get(target)
        if old is not None:
            if old.ident == ident:
                raise self.error(key, f"set twice in one file (also as '{old.key}'); keep one")
            if aliases.map_value(target, old.value) != aliases.map_value(target, value):
                raise self.error(
                    key,
                    f"{value!r} conflicts with '{old.key}': {old.value!r} (both set "
                    f"{target[0]}.{target[1]}); remove one",
                )
            return
        self.assignments[target] = Assignment(target, value, key, self.source, ident)

    def note(self, key: str, reason: str) -> None:
        self.notes.append(f"{self.source}: key '{key}' has no effect here: {reason}")
        self.noted_keys.append(key)

    # -- walking a mapping --------------------------------------------------------------------------------

    def walk(self, mapping: dict) -> None:
        for raw, value in mapping.items():
            key = normalize_key(raw)
            if not isinstance(key, str):
                raise ConfigError(f"{self.source}: key {raw!r}: config keys must be strings")
            self.top_level(key, raw, value)

    def top_level(self, key: str, shown: str, value: Any) -> None:
        if key in aliases.HANDLERS and not (
            key in GROUPS and isinstance(value, dict) and key not in aliases.HANDLER_TAKES_DICT
        ):
            aliases.HANDLERS[key](self, shown, value)
        elif key in GROUPS:
            if not isinstance(value, dict):
                raise self.error(shown, f"expected a mapping of {key} settings, got {value!r}")
            self.group(key, shown, value)
        elif key in FLAT:
            self.set(FLAT[key], value, shown)
        elif key in aliases.RENAMES:
            self.set(aliases.RENAMES[key], value, shown)
        elif key in aliases.NO_EFFECT:
            self.note(shown, aliases.NO_EFFECT[key])
        elif key in aliases.ONLY_DEFAULT:
            allowed, reason = aliases.ONLY_DEFAULT[key]
            if value in allowed:
                self.note(shown, reason)
            else:
                raise self.error(shown, f"unsupported value {value!r}: {reason}")
        elif key in aliases.REJECTED:
            raise self.error(shown, f"not supported: {aliases.REJECTED[key]}")
        else:
            raise self.error(shown, "unknown key" + did_you_mean(key, known_top_level_keys()))

    def group(self, group: str, shown: str, mapping: dict) -> None:
        fields = group_fields(group)
        for raw, value in mapping.items():
            key = normalize_key(raw)
            inner = f"{shown}.{raw}"
            if key in fields:
                self.set((group, key), value, inner)
            elif (group, key) in aliases.GROUP_RENAMES:
                self.set(aliases.GROUP_RENAMES[(group, key)], value, inner)
            elif (group, key) in aliases.GROUP_NO_EFFECT:
                self.note(inner, aliases.GROUP_NO_EFFECT[(group, key)])
            else:
                raise self.error(inner, f"unknown {group} setting" + did_you_mean(key, fields))


def known_top_level_keys() -> list[str]:
    return sorted(
        set(GROUPS)
        | set(FLAT)
        | set(aliases.RENAMES)
        | set(aliases.HANDLERS)
        | set(aliases.NO_EFFECT)
        | set(aliases.ONLY_DEFAULT)
        | set(aliases.REJECTED)
    )


# -- type checking ------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a mapping",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, choices: tuple | None, where: str) -> Any:
    """`value` checked against the field type `tp` (and choices); raises with `where` ("file: key 'k'")."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_describe(tp)}, got null")
    base = typing.get_origin(tp) or tp
    out: Any = value
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif base is int:
        if isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif base is float:
        # PyYAML reads `1e-4` (no dot) as a string, a YAML 1.1 rule that surprises everyone: accept it.
        if isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        else:
            out = float(value)
    elif base is str:
        if isinstance(value, int) and not isinstance(value, bool):
            out = str(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif base is list:
        if isinstance(value, str):
            out = [value]  # a single path or task name where a list is expected
        elif isinstance(value, (list, tuple)):
            out = list(value)
        else:
            raise ConfigError(f"{where}: expected a list, got {value!r}")
    elif base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        out = dict(value)
    if choices is not None:
        out = _choose(out, choices, where)
    return out


def _choose(value: Any, choices: tuple, where: str) -> Any:
    if value in choices:
        return value
    if isinstance(value, str):
        for c in choices:
            if isinstance(c, str) and c.lower() == value.lower():
                return c
    raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")


# -- building -----------------------------------------------------------------------------------------------


def collect(mapping: dict, source: str) -> Collector:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(mapping).__name__}")
    c = Collector(source)
    c.walk(mapping)
    return c


def build(collectors: list[Collector], announce: bool = True) -> Resolved:
    merged: dict[tuple[str, str], Assignment] = {}
    notes: list[str] = []
    for c in collectors:
        merged.update(c.assignments)
        notes.extend(c.notes)
    extras = aliases.apply_pseudo_fields(merged)
    groups = {}
    for g, cls in GROUPS.items():
        types = field_types(g)
        kwargs = {}
        for name, f in group_fields(g).items():
            a = merged.get((g, name))
            if a is None:
                continue
            where = f"{a.source}: key '{a.key}'"
            reason = aliases.rejected_value((g, name), a.value)
            if reason:
                raise ConfigError(f"{where}: unsupported value {a.value!r}: {reason}")
            value = aliases.map_value((g, name), a.value)
            kwargs[name] = coerce(value, types[name], f.metadata.get("choices"), where)
        groups[g] = cls(**kwargs)
    provenance = {t: a for t, a in merged.items() if t[0] in GROUPS}
    resolved = Resolved(Config(**groups), provenance, notes)
    derive(resolved.config, **extras)
    _fill_mup_base(resolved)
    validate(resolved)
    if announce:
        announce_notes(collectors)
    return resolved


_MUP_BASE = {
    "mup_base_hidden_size": "hidden_size",
    "mup_base_num_attention_heads": "num_attention_heads",
    "mup_base_intermediate_size": "intermediate_size",
}


def _fill_mup_base(r: Resolved) -> None:
    """model.mup_base_config: the base config's widths fill the mup_base_* fields left unset (a config read
    back from a checkpoint has them all, so it never needs the file again)."""
    m = r.config.model
    if not m.use_mup or m.mup_base_config is None or all(getattr(m, k) is not None for k in _MUP_BASE):
        return
    where = r.where("model", "mup_base_config")
    if not os.path.isfile(m.mup_base_config):
        raise ConfigError(f"{where}: {m.mup_base_config} is not a file; give the base model's config file")
    try:  # the base's own muP settings do not matter: only its shapes
        base = resolve([m.mup_base_config], ["model.mup_base_config=null"], announce=False)
    except ConfigError as e:
        raise ConfigError(f"{where}: the base config does not load: {e}") from None
    for field_name, base_field in _MUP_BASE.items():
        if getattr(m, field_name) is None:
            setattr(m, field_name, getattr(base.config.model, base_field))


def announce_notes(collectors: list[Collector]) -> None:
    """Accepted-but-inert keys are never silent, but a GPT-NeoX config has a dozen of them (fusion flags,
    DeepSpeed bucket sizes): one short line per file (stderr by default, via logging's last resort handler);
    `neox config show` lists each key with its reason."""
    for c in collectors:
        if c.noted_keys:
            log.warning(
                "%s: %d key(s) have no effect in neox (`neox config show` lists them and why)",
                c.source,
                len(c.noted_keys),
            )


def resolve(
    paths: Iterable[str] = (),
    overrides: Iterable[str] = (),
    config_dir: str | None = None,
    dicts: Iterable[tuple[dict, str]] = (),
    training: bool = False,
    announce: bool = True,
) -> Resolved:
    """Files (optionally under `config_dir`, like GPT-NeoX's `deepy.py -d`), then dicts, then `--set` items;
    `announce=False` leaves the no-effect keys to the caller (they are in `Resolved.notes`)."""
    collectors = []
    for p in paths:
        path = os.path.join(config_dir, p) if config_dir and not os.path.isabs(p) else p
        collectors.append(collect(read_config_file(path), path))
    for mapping, source in dicts:
        collectors.append(collect(mapping, source))
    for item in overrides:
        source, mapping = parse_override(item)
        collectors.append(collect(mapping, source))
    resolved = build(collectors, announce)
    if training:
        validate_training(resolved)
    return resolved


def load(
    paths: Iterable[str] | str,
    overrides: Iterable[str] = (),
    config_dir: str | None = None,
    training: bool = False,
    announce: bool = True,
) -> Config:
    """Config from files merged in order, then `--set KEY=VALUE` overrides; `training` adds the checks a
    training run needs (a dataset, a tokenizer file)."""
    if isinstance(paths, str):
        paths = [paths]
    return resolve(paths, overrides, config_dir, training=training, announce=announce).config


def from_dict(d: dict, source: str = "<dict>", training: bool = False) -> Config:
    return resolve(dicts=[(d, source)], training=training).config


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (lists, not tuples) that `yaml.safe_dump` writes and `from_dict` reads back."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))
