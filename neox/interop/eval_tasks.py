"""Local lm-eval tasks (LAMBADA, PIQA, WikiText-2) that read the shared offline data instead of the HF Hub.

The YAML templates in neox/interop/tasks/ hold `@NEOX_DATA@` where the data folder goes; the harness resolves
relative data paths against the working directory, so the absolute path is filled in at run time and the
filled files are written to a cache folder that is passed to the harness as an include path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from neox.errors import NeoxError

TEMPLATES = Path(__file__).with_name("tasks")
PLACEHOLDER = "@NEOX_DATA@"


def local_task_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.yaml"))


def find_data_dir() -> Path:
    """The shared data folder: $NEOX_SHARED_DATA, $NEOX_SHARED/data, or a `shared/data` beside the checkout."""
    candidates = []
    if os.environ.get("NEOX_SHARED_DATA"):
        candidates.append(Path(os.environ["NEOX_SHARED_DATA"]))
    if os.environ.get("NEOX_SHARED"):
        candidates.append(Path(os.environ["NEOX_SHARED"]) / "data")
    candidates += [
        Path(__file__).resolve().parents[3] / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    for c in candidates:
        if (c / "eval").is_dir():
            return c.resolve()
    raise NeoxError(
        "local eval tasks need the shared data folder (eval/, corpora/): set NEOX_SHARED_DATA "
        f"to it; looked in {', '.join(str(c) for c in candidates)}"
    )


def materialize(data_dir: Path | None = None) -> Path:
    """Write the filled task YAMLs to a cache folder keyed by the data path; returns the folder."""
    data_dir = Path(data_dir) if data_dir else find_data_dir()
    key = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"neox-eval-tasks-{key}"
    out.mkdir(parents=True, exist_ok=True)
    for tpl in TEMPLATES.glob("*.yaml"):
        text = tpl.read_text().replace(PLACEHOLDER, str(data_dir.resolve()))
        dest = out / tpl.name
        if not dest.exists() or dest.read_text() != text:
            tmp = dest.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(dest)
    return out


def local_task_dirs(tasks: list[str]) -> list[str]:
    """Include paths needed for the requested tasks: the filled local templates when any is requested."""
    if any(t in local_task_names() for t in tasks):
        return [str(materialize())]
    return []
