"""What the launcher makes of its workers' records: every worker stopped with a checkpoint -> 75; a hang
reported on a failed run -> 124; otherwise torchrun's own code. Only the last torchrun attempt counts."""

from __future__ import annotations

import json

from neox.parallel.worker_status import (
    EXIT_HANG,
    EXIT_PREEMPTED,
    RESUME_MARKER,
    launcher_exit_code,
    resumable_after_stop,
    worker_pids,
)


def write(folder, attempt, rank, record):
    (folder / f"attempt{attempt}.rank{rank}.json").write_text(json.dumps(record))


def test_exit_codes_from_the_records(tmp_path):
    assert launcher_exit_code(0, tmp_path, 2) == 0
    assert launcher_exit_code(1, tmp_path, 2) == 1
    write(tmp_path, 0, 0, {"event": "hang"})
    assert launcher_exit_code(1, tmp_path, 2) == EXIT_HANG
    assert launcher_exit_code(0, tmp_path, 2) == 0  # a hang that a restart got past: the job succeeded
    write(tmp_path, 1, 0, {"event": "preempted", "saved": True})
    assert launcher_exit_code(1, tmp_path, 2) == 1  # one of two workers reported: not a clean stop
    write(tmp_path, 1, 1, {"event": "preempted", "saved": True})
    assert launcher_exit_code(1, tmp_path, 2) == EXIT_PREEMPTED  # torchrun's own code after a signal is 1
    write(tmp_path, 1, 1, {"event": "preempted", "saved": False})
    assert launcher_exit_code(0, tmp_path, 2) == 0


def test_worker_pids_are_the_latest_attempts(tmp_path):
    assert worker_pids(tmp_path) == []
    (tmp_path / "attempt0.rank0.pid").write_text("11")
    (tmp_path / "attempt1.rank0.pid").write_text("21")
    (tmp_path / "attempt1.rank1.pid").write_text("22")
    assert sorted(worker_pids(tmp_path)) == [21, 22]


def test_the_resume_marker_holds_only_while_its_checkpoint_is_the_newest(tmp_path):
    assert not resumable_after_stop(tmp_path)
    (tmp_path / RESUME_MARKER).write_text(json.dumps({"checkpoint": "iter_0000004", "reason": "SIGTERM"}))
    (tmp_path / "latest").write_text("iter_0000004\n")
    assert resumable_after_stop(tmp_path)
    (tmp_path / "latest").write_text("iter_0000010\n")  # the resumed run saved on: a new run is refused again
    assert not resumable_after_stop(tmp_path)
