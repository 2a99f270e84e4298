"""Typed configuration: `load` YAML/JSON files (GPT-NeoX keys accepted), `from_dict`, `to_dict`.

See docs/config.md (generated from schema.py) for every key, and docs/architecture.md for the contract.
"""

from neox.config.loader import from_dict, load, to_dict
from neox.config.schema import Config
from neox.config.validate import resolve_batch, resolve_vocab

__all__ = ["Config", "from_dict", "load", "resolve_batch", "resolve_vocab", "to_dict"]
