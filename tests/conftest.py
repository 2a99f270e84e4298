"""Shared fixtures. Tests that need ../shared/data skip with a reason when it is absent (a clone elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEOX_SHARED", ROOT.parent / "shared")).resolve()
SHARED_DATA = SHARED / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped (with the reason) where torch sees none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (tokenizers, corpora, eval sets); skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set NEOX_SHARED or clone beside ../shared)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores shared with other processes: a fixed small thread count keeps op timings sane: with more threads than
    # free cores every op waits for the slowest thread.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
