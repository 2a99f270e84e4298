"""Local lm-eval tasks (LAMBADA, PIQA, WikiText-2) that read files in the eval data folder, not the HF Hub.

`neox prepare lambada|piqa|wikitext2` downloads those files (checksummed) into the eval data folder:
`neox eval --data-dir`, else $NEOX_EVAL_DATA, else ~/.cache/neox/eval-data. The YAML templates in
neox/interop/tasks/ hold `@NEOX_DATA@` where the folder goes; the harness resolves relative data paths against
the working directory, so the absolute path is filled in at run time and the filled files are written to a
cache folder that is passed to the harness as an include path.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from neox.data.eval_sets import EVAL_DATA_ENV, eval_data_dir, eval_set_for
from neox.errors import NeoxError

TEMPLATES = Path(__file__).with_name("tasks")
PLACEHOLDER = "@NEOX_DATA@"


def local_task_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.yaml"))


def data_files(task: str) -> list[str]:
    """The paths (relative to the eval data folder) that local task `task` reads, as its template names them."""
    text = (TEMPLATES / f"{task}.yaml").read_text()
    return re.findall(re.escape(PLACEHOLDER) + r"/(\S+)", text)


def find_data_dir(tasks: list[str] = (), data_dir: str | Path | None = None) -> Path:
    """The eval data folder, checked to hold every file the local `tasks` read (a one-line error naming the
    missing file and the `neox prepare` command that downloads it)."""
    root = Path(eval_data_dir(data_dir))
    for task in tasks:
        for rel in data_files(task):
            if not (root / rel).is_file():
                where = "--data-dir" if data_dir else f"--data-dir (or ${EVAL_DATA_ENV})"
                raise NeoxError(
                    f"{task}: {root / rel} is missing; run `neox prepare {eval_set_for(rel)}` to download it, "
                    f"or point {where} at a folder that has it"
                )
    return root


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


def local_task_dirs(tasks: list[str], data_dir: str | Path | None = None) -> list[str]:
    """Include paths needed for the requested tasks: the filled local templates when any is requested (after
    checking that their data is there)."""
    local = [t for t in tasks if t in local_task_names()]
    if local:
        return [str(materialize(find_data_dir(local, data_dir)))]
    return []
