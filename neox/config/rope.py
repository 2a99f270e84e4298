"""`model.rope_scaling`: the RoPE scaling methods transformers names in a config's `rope_scaling`.

The dict is validated here once (config load) and read back by the model as a `RopeScaling`, so both agree
on the defaults. No torch: the frequencies themselves are computed in neox.model.positional.
"""

from __future__ import annotations

from dataclasses import dataclass

ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")

# keys each type reads besides type / rope_type (transformers' names)
_KEYS = {
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}


@dataclass(frozen=True)
class RopeScaling:
    """One scaling method with every parameter filled in (defaults as transformers has them)."""

    type: str
    factor: float
    # the context the unscaled model was trained for; defaults to model.max_position_embeddings
    original_max_position_embeddings: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def as_dict(self) -> dict:
        """The transformers `rope_scaling` / `rope_parameters` entries of this method (without rope_theta)."""
        d = {"rope_type": self.type, "factor": self.factor}
        if self.type != "linear":
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.type == "yarn":
            d.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, k) is not None:
                    d[k] = getattr(self, k)
        return d


def _number(d: dict, key: str, positive: bool = True) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{key} must be a number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{key} must be positive, got {v!r}")
    return float(v)


def parse_rope_scaling(d: dict | None, max_positions: int) -> RopeScaling | None:
    """The RopeScaling a `rope_scaling` dict asks for (None for no scaling); ValueError names the bad entry."""
    if d is None or d == {}:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"must be a mapping such as {{type: linear, factor: 2.0}}, got {d!r}")
    given = {k: v for k, v in d.items() if k not in ("type", "rope_type")}
    kind = d.get("rope_type", d.get("type"))
    if "type" in d and "rope_type" in d and d["type"] != d["rope_type"]:
        raise ValueError(f"type {d['type']!r} and rope_type {d['rope_type']!r} disagree; give one")
    if kind in (None, "default") and not given:
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"type {kind!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    unknown = sorted(set(given) - _KEYS[kind])
    if unknown:
        raise ValueError(f"{kind} scaling has no key {unknown[0]!r}; it reads {', '.join(sorted(_KEYS[kind]))}")
    if "factor" not in given:
        raise ValueError(f"{kind} scaling needs a factor (how many times longer the context gets)")
    factor = _number(given, "factor")
    if factor < 1.0:
        raise ValueError(f"factor must be at least 1 (it stretches the context), got {factor:g}")
    original = given.get("original_max_position_embeddings", max_positions)
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(f"original_max_position_embeddings must be a positive integer, got {original!r}")
    floats = {
        k: _number(given, k, positive=k not in ("attention_factor",))
        for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")
        if k in given
    }
    floats.update({k: _number(given, k) for k in ("mscale", "mscale_all_dim") if k in given})
    truncate = given.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"truncate must be true or false, got {truncate!r}")
    out = RopeScaling(kind, factor, original, truncate=truncate, **floats)
    if kind == "llama3" and not out.high_freq_factor > out.low_freq_factor:
        raise ValueError(
            f"high_freq_factor ({out.high_freq_factor:g}) must be larger than low_freq_factor ({out.low_freq_factor:g})"
        )
    return out
