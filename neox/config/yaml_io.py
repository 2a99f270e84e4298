"""Reading config files: YAML (GPT-NeoX flow mappings included) and JSON, refusing duplicate keys.

PyYAML and `json` both keep the last of two equal keys without a word; a config where `num-layers` and
`num_layers` both appear would then depend on which came last, so duplicates (after hyphen/underscore
normalisation) are reported with their line numbers instead.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from neox.config.fields import normalize_key
from neox.errors import ConfigError

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_Base):  # type: ignore[misc, valid-type]
    source = "<yaml>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, tuple[Any, int]] = {}
            # Only the mapping's own keys count: a key it shares with a `<<: *anchor` merge overrides it.
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                nk = normalize_key(key) if isinstance(key, (str, int, float, bool)) else id(key_node)
                if nk in seen:
                    first, first_line = seen[nk]
                    also = "" if first == key else f" as '{first}'"
                    raise ConfigError(
                        f"{self.source}: line {line}: key '{key}' appears twice in one mapping "
                        f"(first on line {first_line}{also}); keep one"
                    )
                seen[nk] = (key, line)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    loader = _StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def _json_pairs(source: str):
    def hook(pairs):
        out: dict[str, Any] = {}
        seen: dict[Any, str] = {}
        for k, v in pairs:
            nk = normalize_key(k)
            if nk in seen:
                also = "" if seen[nk] == k else f" (also as '{seen[nk]}')"
                raise ConfigError(f"{source}: key '{k}' appears twice in one object{also}; keep one")
            seen[nk] = k
            out[k] = v
        return out

    return hook


def read_config_file(path: str) -> dict:
    """The mapping in `path` (YAML or JSON); errors name the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text, object_pairs_hook=_json_pairs(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    else:
        data = parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, dict]:
    """`--set a.b=VALUE` -> ("--set a.b=VALUE", {"a": {"b": VALUE}}), VALUE parsed as YAML."""
    source = f"--set {item}"
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: expected KEY=VALUE (e.g. --set model.hidden_size=128)")
    try:
        value = parse_yaml(raw, source) if raw.strip() else None
    except ConfigError:
        value = raw  # not YAML (e.g. a path with ': ' in it): take the text as it is
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"{source}: empty component in key '{key}'")
    for part in reversed(parts):
        value = {part: value}
    return source, value
