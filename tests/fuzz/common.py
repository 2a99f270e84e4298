"""Shared settings for the property-based fuzz tests: what may escape is a NeoxError with a one-line message."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, settings

from neox.errors import NeoxError

# derandomize: the same cases on every run, so CI is reproducible; deadline None: a shared 2-core box is slow
_BASE = settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def only_neox_errors():
    """Let the body succeed or raise a NeoxError whose message is one non-empty line; anything else is a bug."""
    try:
        yield
    except NeoxError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg, f"not a one-line message: {msg!r}"


def fuzz(examples: int) -> settings:
    """The shared settings with ``examples`` generated cases."""
    return settings(_BASE, max_examples=examples)
