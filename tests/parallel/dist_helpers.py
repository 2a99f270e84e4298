"""Start a test worker script under torchrun (gloo, one thread per process) and fail with its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def torchrun(script: str, nproc: int, *args: str, timeout: int = 300, extra: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *extra,
        str(HERE / script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_cases(script: str, nproc: int, cases: list, tmp_path: Path, timeout: int = 300) -> dict:
    """Hand `cases` to a worker that runs them all in one launch (`script OUT.json CASES.json`); its results."""
    import json

    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torchrun(script, nproc, str(tmp_path / "out.json"), str(tmp_path / "cases.json"), timeout=timeout)
    return json.loads((tmp_path / "out.json").read_text())
