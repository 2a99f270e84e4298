"""train.max_runtime's duration forms (seconds, units, Slurm-style clock times) and their one-line errors."""

from __future__ import annotations

import pytest

from neox.config import from_dict
from neox.config.validate import parse_duration
from neox.errors import ConfigError


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("3600", 3600),
        (3600, 3600),  # a YAML integer
        ("90s", 90),
        ("90m", 90 * 60),
        ("2h", 2 * 3600),
        ("1h30m", 3600 + 30 * 60),
        ("1.5h", 5400),
        ("1d", 86400),
        ("01:02:03", 3600 + 2 * 60 + 3),
        ("1-00:00:30", 86400 + 30),
        (" 2H ", 7200),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "2x", "1:2", "10:61:00", "-5", "h", "0", "00:00:00"])
def test_bad_durations_are_one_line_errors_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"^train.max_runtime: ") as e:
        parse_duration(text)
    assert "\n" not in str(e.value)


def test_the_config_checks_both_keys_at_load():
    assert from_dict({"train": {"max_runtime": "2h", "hang_timeout": 30}}).train.hang_timeout == 30.0
    with pytest.raises(ConfigError, match="max_runtime.*not a duration"):
        from_dict({"train": {"max_runtime": "soon"}})
    with pytest.raises(ConfigError, match="hang_timeout.*must be a number of seconds > 0"):
        from_dict({"train": {"hang_timeout": 0}})
