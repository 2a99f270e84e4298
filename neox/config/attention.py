"""Per-layer attention types (GPT-NeoX's `attention_config`) and the block-sparse parameters (`sparsity_config`).

No torch here: the loader checks and expands these at load, and neox/model/sparsity.py builds the layouts from
`SparsityParams`. The defaults per type are the ones GPT-NeoX passes to DeepSpeed's sparsity configs
(megatron/model/utils.py `configure_sparse_attention`), always in their unidirectional (causal) form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neox.config.fields import did_you_mean, normalize_key
from neox.config.schema import ModelConfig
from neox.errors import ConfigError

GLOBAL = "global"
# `flash` is GPT-NeoX's name for global attention through the flash-attention kernel: the same math, so it
# is stored as global (the attention path picks its own kernel).
ALIASES = {"flash": GLOBAL}
BLOCK_SPARSE = ("local", "sparse_fixed", "sparse_variable", "bigbird", "bslongformer")
ATTENTION_TYPES = (GLOBAL, *BLOCK_SPARSE)
NOT_IMPLEMENTED = {
    "gmlp": "gMLP layers are not implemented",
    "amlp": "gMLP (amlp) layers are not implemented",
    "rwkv": "RWKV layers are not implemented",
    "mamba": "Mamba layers are not implemented",
}

# Keys GPT-NeoX reads from `sparsity_config` (plus DeepSpeed's two direction switches at their causal values).
SPARSITY_KEYS = (
    "block",
    "different_layout_per_head",
    "num_local_blocks",
    "num_global_blocks",
    "num_different_global_patterns",
    "num_random_blocks",
    "local_window_blocks",
    "global_block_indices",
    "global_block_end_indices",
    "num_sliding_window_blocks",
)
_CAUSAL_ONLY = {"attention": "unidirectional", "horizontal_global_attention": False}


@dataclass(frozen=True)
class SparsityParams:
    """One block-sparse type's parameters with GPT-NeoX's defaults for that type filled in.

    kind: local, sparse_fixed, sparse_variable, bigbird or bslongformer. Only the fields the kind reads matter;
    the others keep their defaults. Lists are tuples so that the value is hashable (layouts can be cached).
    """

    kind: str
    block: int = 16
    different_layout_per_head: bool = False
    num_local_blocks: int = 4
    num_global_blocks: int = 1
    num_different_global_patterns: int = 1
    num_random_blocks: int = 0
    local_window_blocks: tuple[int, ...] = (4,)
    global_block_indices: tuple[int, ...] = (0,)
    global_block_end_indices: tuple[int, ...] | None = None
    num_sliding_window_blocks: int = 3


# Per kind: the keys it reads and the defaults GPT-NeoX gives them where they differ from SparsityParams'.
_READS: dict[str, tuple[str, ...]] = {
    "local": ("block", "num_local_blocks", "num_sliding_window_blocks"),
    "sparse_fixed": (
        "block",
        "different_layout_per_head",
        "num_local_blocks",
        "num_global_blocks",
        "num_different_global_patterns",
    ),
    "sparse_variable": (
        "block",
        "different_layout_per_head",
        "num_random_blocks",
        "local_window_blocks",
        "global_block_indices",
        "global_block_end_indices",
    ),
    "bigbird": (
        "block",
        "different_layout_per_head",
        "num_random_blocks",
        "num_sliding_window_blocks",
        "num_global_blocks",
    ),
    "bslongformer": (
        "block",
        "different_layout_per_head",
        "num_sliding_window_blocks",
        "global_block_indices",
        "global_block_end_indices",
    ),
}
_DEFAULTS: dict[str, dict[str, Any]] = {"bigbird": {"num_random_blocks": 1}}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_int(x) for x in v)


def check_sparsity_keys(d: Any, where: str) -> dict:
    """`sparsity_config` with normalised keys, each checked for its type; `where` is "file: key 'k'"."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sparsity settings, got {d!r}")
    out: dict[str, Any] = {}
    for raw, v in d.items():
        k = normalize_key(raw)
        at = f"{where[:-1]}.{raw}'" if where.endswith("'") else f"{where}.{raw}"
        if k in _CAUSAL_ONLY:
            if v != _CAUSAL_ONLY[k]:
                raise ConfigError(f"{at}: only {_CAUSAL_ONLY[k]!r} is supported: GPT-NeoX's layouts are causal")
            continue
        if k not in SPARSITY_KEYS:
            raise ConfigError(f"{at}: unknown sparsity setting" + did_you_mean(str(k), SPARSITY_KEYS))
        if k == "different_layout_per_head":
            if not isinstance(v, bool):
                raise ConfigError(f"{at}: expected true or false, got {v!r}")
        elif k in ("local_window_blocks", "global_block_indices"):
            if not _int_list(v) or not v or any(x < (1 if k == "local_window_blocks" else 0) for x in v):
                low = "positive" if k == "local_window_blocks" else "non-negative"
                raise ConfigError(f"{at}: expected a non-empty list of {low} integers, got {v!r}")
            v = list(v)
        elif k == "global_block_end_indices":
            if v is not None and (not _int_list(v) or any(x < 1 for x in v)):
                raise ConfigError(f"{at}: expected null or a list of positive integers, got {v!r}")
            v = None if v is None else list(v)
        else:
            low = 1 if k in ("block", "num_local_blocks", "num_different_global_patterns") else 0
            if not _is_int(v) or v < low:
                raise ConfigError(f"{at}: expected an integer >= {low}, got {v!r}")
        out[k] = v
    return out


def sparsity_params(kind: str, sparsity_config: Mapping[str, Any]) -> SparsityParams:
    """The parameters `kind` reads from a (checked) `sparsity_config`, with GPT-NeoX's defaults for that kind."""
    if kind not in BLOCK_SPARSE:
        raise ValueError(f"{kind!r} is not a block-sparse attention type ({', '.join(BLOCK_SPARSE)})")
    d = {**_DEFAULTS.get(kind, {}), **{k: v for k, v in sparsity_config.items() if k in _READS[kind]}}
    if kind == "local":
        # GPT-NeoX: the window is num_local_blocks, else num_sliding_window_blocks, else 4 blocks
        d = {"block": d.get("block", 16)}
        d["num_sliding_window_blocks"] = sparsity_config.get(
            "num_local_blocks", sparsity_config.get("num_sliding_window_blocks", 4)
        )
    for k in ("local_window_blocks", "global_block_indices", "global_block_end_indices"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return SparsityParams(kind=kind, **d)


def check_sparsity_params(p: SparsityParams, seq_length: int, where: str) -> None:
    """The rules DeepSpeed checks when it builds the layout, at load: `where` names the sparsity_config key.

    Counts larger than the sequence's blocks (a window, random or global blocks) are clipped to it rather than
    refused as DeepSpeed does: configs/sparse.yml's 32-block window is meant for GPT-NeoX's default 2048
    tokens, and over a shorter sequence it simply covers every block."""
    if seq_length % p.block:
        raise ConfigError(
            f"{where}: block {p.block} does not divide seq_length {seq_length} ({p.kind} attention works on "
            "whole blocks); pick a block size that divides it"
        )

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {p.kind}: {message}")

    if p.kind == "sparse_fixed":
        need(p.num_global_blocks >= 1, "num_global_blocks must be at least 1")
        need(
            p.num_local_blocks % p.num_global_blocks == 0,
            f"num_global_blocks {p.num_global_blocks} must divide num_local_blocks {p.num_local_blocks}",
        )
        need(
            p.num_different_global_patterns == 1 or p.different_layout_per_head,
            "num_different_global_patterns > 1 needs different_layout_per_head: true",
        )
        most = p.num_local_blocks // p.num_global_blocks
        need(
            p.num_different_global_patterns <= most,
            f"num_different_global_patterns {p.num_different_global_patterns} is more than num_local_blocks / "
            f"num_global_blocks = {most}",
        )
    if p.kind in ("sparse_variable", "bslongformer") and p.global_block_end_indices is not None:
        starts, ends = p.global_block_indices, p.global_block_end_indices
        need(len(starts) == len(ends), f"{len(ends)} global_block_end_indices for {len(starts)} global_block_indices")
        bad = [(s, e) for s, e in zip(starts, ends) if s >= e]
        need(not bad, f"each global block end index must be above its start, got {bad}")


def expand_attention_config(value: Any, num_layers: int, where: str) -> list[str]:
    """GPT-NeoX's `attention_config` -> one type per layer.

    Forms: an expanded list of names (`["global", "local", ...]`), or `[[pattern, count], ...]` with each
    pattern repeated count times; count `"all"` repeats the pattern over every layer (it must divide
    num_layers, and it must be the only entry: GPT-NeoX would drop the entries beside it).
    """
    if value is None:
        return [GLOBAL] * num_layers
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f'{where}: expected a list like [[["global"], {num_layers}]], got {value!r}')
    if all(isinstance(v, str) for v in value):
        names = list(value)
    else:
        names = []
        for item in value:
            ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
            pattern, count = (item[0], item[1]) if ok else (None, None)
            if not ok or not pattern or not all(isinstance(p, str) for p in pattern):
                raise ConfigError(
                    f'{where}: expected entries like [["global"], 12] or [["local", "global"], "all"], got {item!r}'
                )
            if count == "all":
                if len(value) != 1:
                    raise ConfigError(f"{where}: an entry with count 'all' must be the only entry, got {value!r}")
                if num_layers % len(pattern):
                    raise ConfigError(
                        f"{where}: num_layers {num_layers} is not a multiple of the pattern {list(pattern)} of "
                        f"{len(pattern)} types repeated over 'all' layers"
                    )
                count = num_layers // len(pattern)
            if not _is_int(count) or count < 0:
                raise ConfigError(f"{where}: expected a layer count or 'all' in {item!r}, got {count!r}")
            names.extend(list(pattern) * count)
    if len(names) != num_layers:
        raise ConfigError(f"{where}: gives {len(names)} layer types for num_layers {num_layers}; give one per layer")
    return [_type_name(n, where) for n in names]


def type_problem(name: Any) -> str | None:
    """Why `name` is not an attention type neox runs, or None when it is one."""
    if not isinstance(name, str):
        return f"attention types are names, got {name!r}"
    n = ALIASES.get(name.strip().lower(), name.strip().lower())
    if n in NOT_IMPLEMENTED:
        return f"attention type {name!r} is not supported: {NOT_IMPLEMENTED[n]}"
    if n not in ATTENTION_TYPES:
        return f"unknown attention type {name!r}; use one of {', '.join(ATTENTION_TYPES)} (or flash)"
    return None


def _type_name(name: str, where: str) -> str:
    problem = type_problem(name)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    n = name.strip().lower()
    return ALIASES.get(n, n)


def layer_types(cfg: ModelConfig) -> list[str]:
    """The attention type of each layer; a ModelConfig built directly (not loaded) may leave it unset."""
    if cfg.attention_types is None:
        return [GLOBAL] * cfg.num_layers
    return list(cfg.attention_types)


def layer_sparsity(cfg: ModelConfig, layer: int) -> SparsityParams | None:
    """The block-sparse parameters of one layer, or None for global attention."""
    kind = layer_types(cfg)[layer]
    return None if kind == GLOBAL else sparsity_params(kind, cfg.sparsity_config)
