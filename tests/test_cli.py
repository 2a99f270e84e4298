"""The top-level `neox` entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neox.cli import main


def test_reader_gone_is_quiet(tmp_path):
    """`neox config show ... | head -1`: once the reader has gone the command stops without a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "neox.cli", "config", "show", "configs/pythia-1.4b.yml"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader leaves before the first byte is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_no_command_prints_help(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "usage: neox" in capsys.readouterr().out
