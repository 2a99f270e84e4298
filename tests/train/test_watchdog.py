"""The hang watchdog and the collective-timeout line, in-process: `os._exit` is replaced by a recorder, so the
test sees the line, the exit code and the launcher record a stuck process would leave."""

from __future__ import annotations

import json
import threading

import pytest

from neox.parallel.worker_status import EXIT_HANG, STATUS_DIR_ENV
from neox.train import watchdog as wd


@pytest.fixture
def exits(monkeypatch, tmp_path):
    """Codes passed to os._exit (the watchdog's exit), with an event set on the first."""
    seen: list[int] = []
    fired = threading.Event()

    def fake_exit(code):
        seen.append(code)
        fired.set()

    monkeypatch.setattr(wd.os, "_exit", fake_exit)
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    return seen, fired


def test_no_beat_within_the_timeout_names_rank_iteration_pending_step_and_frame(exits, capfd, tmp_path):
    seen, fired = exits
    dog = wd.Watchdog(0.4)
    dog.start()
    try:
        dog.beat(5, "train step 6")
        assert fired.wait(10), "the watchdog did not fire"
    finally:
        dog.stop()
    assert seen == [EXIT_HANG]
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("neox train: error: rank 1 of 2: no progress for ")
    assert "after iteration 5, pending: train step 6; main thread in wait (" in line  # fired.wait above
    assert f"exiting with code {EXIT_HANG}" in line
    record = json.loads((tmp_path / "attempt0.rank1.json").read_text())
    assert record["event"] == "hang" and record["iteration"] == 5 and record["pending"] == "train step 6"


def test_beats_keep_it_quiet_and_no_timeout_means_no_thread(exits):
    seen, fired = exits
    dog = wd.Watchdog(0.5)
    dog.start()
    try:
        for i in range(12):  # 1.2 s of beats every 0.1 s: never 0.5 s without one
            dog.beat(i, f"train step {i + 1}")
            assert not fired.wait(0.1)
    finally:
        dog.stop()
    assert seen == []
    off = wd.Watchdog(None)
    off.start()
    assert off._thread is None


def test_a_gloo_collective_timeout_becomes_one_line(exits, capfd):
    seen, _ = exits
    # gloo's own words, as a 2-rank all-reduce past its process group's timeout raised them (torch 2.13)
    error = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv "
        "operation to complete"
    )
    assert wd.is_collective_timeout(error) and not wd.is_collective_timeout(RuntimeError("shape mismatch"))
    dog = wd.Watchdog(None)
    dog.beat(7, "train step 8")
    wd.collective_timeout(error, dog, 0.05)
    assert seen == [EXIT_HANG]
    (line,) = capfd.readouterr().err.strip().splitlines()
    assert line.startswith("neox train: error: rank 1 of 2: a collective did not finish within ")
    assert "after iteration 7, pending: train step 8" in line and "Timed out waiting 3000ms" in line
