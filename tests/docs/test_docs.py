"""The docs are tested: every shell command and Python snippet in README.md and docs/*.md runs, in page order.

What runs is extracted from the Markdown (tests/docs/blocks.py says which blocks count). Each page runs in its
own scratch copy of a workspace that looks like the repository after `make train`, so a page's later commands
see the outputs of its earlier ones as a reader's would (preprocess -> train -> generate -> export). The scale
is made tiny around the commands, not in them:

- `configs/tiny-cpu.yml` in the workspace is the real file with the model and batch shrunk (TINY) and its step
  counts divided by ITERS_DIVISOR; a command's own `--set train_iters=N` gets `--set train_iters=N/15` appended,
  so "raise train_iters to continue past the end" still continues past the end;
- the corpus `neox prepare stdlib` writes is cut to its first documents (SHRINK_BYTES) before the tokenizer and
  preprocessing steps that follow it;
- the files a page expects the reader to bring (`my-text.jsonl`, `prompts.txt`, a task YAML, ...) are small;
- `neox eval` runs without the bootstrapped stderr (`--bootstrap-iters 0`: seconds of resampling);
- `../shared/data` exists beside the workspace as beside the repository; the eval sets `neox prepare lambada`
  and `piqa` download come from a local mirror of the shared files ($NEOX_CORPUS_MIRROR, the same checksums
  checked) into the page's own, initially empty, $NEOX_EVAL_DATA.

`make train` is the Makefile's train recipe (read from the Makefile), run once to make the workspace every page
starts from; its prerequisite, creating .venv, is skipped: this test runs in it. After it, the pages' `neox`
commands are forked by tests/forkserver.py's server (neox and torch imported once; the same arguments, working
directory, environment, streams and exit status), so a command costs its own work rather than seconds of
`import torch`; `make train`'s `.venv/bin/neox`, `python`, `torchrun` and snippets still start fresh. A failing
command (non-zero exit) or snippet (an exception) fails with the page and line of its block, and the rest of that
page is skipped. A command whose exact text already passed, from the same start, is not run again. EXCEPTIONS lists
what is skipped, each with its reason: it needs other hardware or hosts, the network, or minutes of compiling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED
from tests.docs.blocks import Command, page_commands
from tests.forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = [c for page in PAGES for c in page_commands(page, ROOT)]
VENV_BIN = ROOT / ".venv" / "bin"

# (page, regular expression searched for in the command, why it is not run here)
EXCEPTIONS = [
    ("README.md", r"^make test$", "runs the whole test suite, this test included (CI runs its steps itself)"),
    ("README.md", r"--nnodes 2", "needs two nodes"),
    ("README.md", r"--hostfile", "needs the hosts of a hostfile, started over ssh"),
    ("README.md", r"--compile", "compiles the decode step: a minute or more on two cores"),
    (
        "docs/benchmarks.md",
        r"bench/train\.py",
        "times pythia-14m/70m training steps: minutes (bf16 on HF: a minute a step)",
    ),
    ("docs/benchmarks.md", r"bench/generate\.py", "compiles pythia-14m/70m decode steps and times them: many minutes"),
    ("docs/benchmarks.md", r"bench/preprocess\.py", "tokenizes 14 MB several times over: minutes"),
    ("docs/parallelism.md", r"pythia-160m\.yml --nproc 8$", "eight processes of Pythia-160M: a GPU node"),
    ("docs/parallelism.md", r"--nnodes 2", "needs two nodes"),
    ("docs/parallelism.md", r"--hostfile", "needs the hosts of a hostfile, started over ssh"),
    ("docs/parallelism.md", r"^srun ", "needs a Slurm allocation of GPU nodes"),
]

# the workspace's configs/tiny-cpu.yml: the real file with these keys replaced, so a 150-step run takes seconds
TINY = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "seq_length": 128,  # the docs generate 64 tokens after a prompt
    "train_micro_batch_size_per_gpu": 2,
    "eval_iters": 1,
}
ITERS_DIVISOR = 15  # 150 steps -> 10
ITER_KEYS = ("train_iters", "save_interval", "eval_interval", "log_interval")
SHRINK_BYTES = 300_000  # `neox prepare stdlib`'s corpus is cut to its first documents up to this size
COMMAND_TIMEOUT_S = 300


def exception_for(command: Command) -> str | None:
    for page, pattern, reason in EXCEPTIONS:
        if command.path == page and re.search(pattern, command.text):
            return reason
    return None


# ---- the workspace -------------------------------------------------------------------------------------------


def _shrink_stdlib(work: Path) -> None:
    corpus = work / "data" / "stdlib" / "stdlib.jsonl"
    kept, size = [], 0
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            if size > SHRINK_BYTES:
                break
            kept.append(line)
            size += len(line.encode())
    corpus.write_text("".join(kept), encoding="utf-8")


# (regular expression, what to do in the workspace after a command that matches it succeeds)
AFTER = [(r"\bneox prepare stdlib\b", _shrink_stdlib)]
# (regular expression, what a command that matches it reads on stdin)
STDIN = [(r"--interactive", "def \n")]


def _speeches(n: int) -> list[str]:
    text = (SHARED / "data" / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("\n\n") if s.strip()][:n]


def _user_files(work: Path) -> None:
    """The files the pages expect readers to bring (their own text, prompts, a tokenizer they downloaded)."""
    speeches = _speeches(240)
    (work / "my-text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches[:80]))
    (work / "data" / "a.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches[80:120]))
    zstandard = pytest.importorskip("zstandard")
    lines = "".join(json.dumps({"text": s}) + "\n" for s in speeches[120:160]).encode()
    (work / "data" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (work / "more").mkdir()
    (work / "more" / "one.txt").write_text("\n\n".join(speeches[160:200]) + "\n")
    (work / "more" / "two.txt").write_text("\n\n".join(speeches[200:240]) + "\n")
    (work / "notes.txt").write_text("\n".join(speeches[:10]) + "\n")
    (work / "prompts.txt").write_text("def \nimport os\nclass \n")
    shutil.copy(SHARED / "data" / "tokenizers" / "20B_tokenizer.json", work / "20B_tokenizer.json")
    _my_task(work / "my_tasks")
    parts = work / "data" / "parts"
    parts.mkdir()
    for name in ("first", "second"):
        for ext in ("bin", "idx"):
            shutil.copy(work / "data" / "stdlib" / f"stdlib_text_document.{ext}", parts / f"{name}_text_document.{ext}")


def _my_task(folder: Path) -> None:
    """A task YAML of the reader's own: the bundled piqa_local task renamed, over 20 questions in a local file."""
    folder.mkdir()
    rows = (SHARED / "data" / "eval" / "piqa_valid_labeled.jsonl").read_text().splitlines()[:20]
    (folder / "my_questions.jsonl").write_text("\n".join(rows) + "\n")
    template = (ROOT / "neox" / "interop" / "tasks" / "piqa_local.yaml").read_text()
    task = "".join(line for line in template.splitlines(keepends=True) if not line.startswith("#"))
    task = task.replace("task: piqa_local", "task: my_task")
    task = task.replace("@NEOX_DATA@/eval/piqa_valid_labeled.jsonl", str(folder / "my_questions.jsonl"))
    assert "task: my_task\n" in task and "piqa_local" not in task and "@NEOX_DATA@" not in task, template
    (folder / "my_task.yaml").write_text(task)


def _tiny_configs(work: Path) -> None:
    shutil.copytree(ROOT / "configs", work / "configs")
    path = work / "configs" / "tiny-cpu.yml"
    cfg = yaml.safe_load(path.read_text())
    missing = set(TINY) - set(cfg)
    assert not missing, f"configs/tiny-cpu.yml no longer sets {sorted(missing)}; update TINY in {__file__}"
    steps = {key: max(1, cfg[key] // ITERS_DIVISOR) for key in ITER_KEYS if key in cfg}
    path.write_text(yaml.safe_dump({**cfg, **TINY, **steps}, sort_keys=False))


def scaled(text: str) -> str:
    """The command with a `--set train_iters=N` of its own followed by the tiny equivalent, and `neox eval`
    without the bootstrapped stderr (seconds of resampling that say nothing about whether the command works)."""
    if re.match(r"neox eval\b", text) and "--bootstrap-iters" not in text:
        return f"{text} --bootstrap-iters 0"
    iters = re.findall(r"--set[ =]train_iters=(\d+)", text)
    if not iters or not re.search(r"\bneox(\.cli)? train\b|\bdeepy\.py\b", text):
        return text
    return f"{text} --set train_iters={max(1, int(iters[-1]) // ITERS_DIVISOR)}"


def make_recipe(target: str) -> list[str]:
    """The shell commands of a Makefile target's recipe, continuations joined and $(VARS) expanded."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    variables = {}
    for line in lines:
        m = re.match(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", line)
        if m:
            variables[m[1]] = m[2].strip()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line)), None)
    assert start is not None, f"Makefile has no target {target!r}"
    commands, pending = [], ""
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        if not pending.startswith("#"):
            commands.append(pending)
        pending = ""

    def expand(text: str) -> str:
        for _ in range(5):
            text = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m[1], ""), text)
        return text

    return [expand(c) for c in commands]


# the eval sets `neox prepare lambada|piqa|wikitext2` fetches, under their upstream file names (its checksums
# check that these are the same files): $NEOX_CORPUS_MIRROR serves them from here instead of the network
MIRROR = {
    "lambada_test.jsonl": "eval/lambada_openai_test.jsonl",
    "valid.jsonl": "eval/piqa_valid.jsonl",
    "valid-labels.lst": "eval/piqa_valid-labels.lst",
    "test.txt": "corpora/wikitext-2/test.txt",
}


def _mirror(folder: Path) -> Path:
    for name, rel in MIRROR.items():
        (folder / name).symlink_to(SHARED / "data" / rel)
    return folder


def _env(parent: Path, mirror: Path) -> dict[str, str]:
    # `source .venv/bin/activate`, as the README has readers do; one thread: models this small gain nothing from a
    # second one, and on a shared machine two threads wait for each other (a step took 10x longer)
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["NEOX_EVAL_DATA"] = str(parent / "eval-data")  # empty until a page runs `neox prepare lambada`
    env["NEOX_CORPUS_MIRROR"] = mirror.as_uri()
    env.pop("PYTHONPATH", None)
    return env


def run_shell(work: Path, text: str, where: str, env: dict[str, str]) -> None:
    text = scaled(text)
    stdin = next((s for pattern, s in STDIN if re.search(pattern, text)), "")
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", text],
        cwd=work,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-3000:]
        pytest.fail(f"{where}: `{text}` exited {proc.returncode}:\n{output}", pytrace=False)
    for pattern, action in AFTER:
        if re.search(pattern, text):
            action(work)


def run_python(work: Path, text: str, where: str, env: dict[str, str]) -> None:
    script = work / f".doc-snippet-{where.replace('/', '_').replace(':', '_')}.py"
    script.write_text(text)
    proc = subprocess.run(
        [str(VENV_BIN / "python"), script.name],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail(f"{where}: the Python snippet raised:\n{proc.stderr[-3000:]}", pytrace=False)


def _layout(parent: Path) -> Path:
    """parent/neox, a workspace like the repository's checkout, and parent/shared -> the shared folder."""
    work = parent / "neox"
    work.mkdir(parents=True)
    (parent / "shared").symlink_to(SHARED, target_is_directory=True)
    for name in (".venv", "bench", "tools", "deepy.py", "Makefile", "pyproject.toml"):
        (work / name).symlink_to(ROOT / name)
    (work / "data").mkdir()
    _tiny_configs(work)
    return work


@dataclass
class Page:
    work: Path  # the page's copy of the workspace: the working directory of its commands
    env: dict[str, str]
    failed: str | None = None  # the block that failed; the rest of the page is skipped


@dataclass
class Workspaces:
    """The after-`make train` workspace (built once) and a scratch copy of it per page."""

    tmp: pytest.TempPathFactory
    base: Path | None = None
    base_failed: str | None = None  # why building it failed: every page fails with it, without a second try
    mirror: Path | None = None
    server: ForkServer | None = None  # forks the pages' `neox` commands (tests/forkserver.py)
    pages: dict[str, Page] = field(default_factory=dict)
    passed: dict[str, str] = field(default_factory=dict)  # command text -> where it passed

    def after_make_train(self) -> Path:
        if self.base_failed:
            pytest.fail(f"the after-`make train` workspace could not be made: {self.base_failed}", pytrace=False)
        if self.base is None:
            self.base_failed = "interrupted"
            self.mirror = _mirror(self.tmp.mktemp("mirror"))
            parent = self.tmp.mktemp("after-make-train")
            work = _layout(parent)
            for text in make_recipe("train"):
                run_shell(work, text, "Makefile (make train)", _env(parent, self.mirror))
            _user_files(work)
            self.server = ForkServer(_env(parent, self.mirror), work)
            self.base, self.base_failed = parent, None
        return self.base

    def page(self, path: str) -> Page:
        if path not in self.pages:
            base = self.after_make_train()
            copy = self.tmp.mktemp(path.replace("/", "-"))
            shutil.rmtree(copy)
            shutil.copytree(base, copy, symlinks=True)
            self.pages[path] = Page(copy / "neox", self.server.path_env(_env(copy, self.mirror)))
        return self.pages[path]


@pytest.fixture(scope="session")
def workspaces(tmp_path_factory, shared_data):
    spaces = Workspaces(tmp_path_factory)
    yield spaces
    if spaces.server is not None:
        spaces.server.close()


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_doc_command(command: Command, workspaces: Workspaces):
    reason = exception_for(command)
    if reason:
        pytest.skip(f"{command} `{command.text.splitlines()[0]}`: {reason}")
    # `neox prepare` always runs: each page's eval data folder starts empty, and the page's later commands read
    # what it fetched there (seconds, from the local mirror)
    if command.text in workspaces.passed and not command.text.startswith("neox prepare"):
        # the same text already ran from the same after-`make train` start; once is enough for a 4-minute budget
        pytest.skip(f"{command}: the same command passed at {workspaces.passed[command.text]}")
    page = workspaces.page(command.path)
    if page.failed:
        pytest.skip(f"{command}: {page.failed} failed earlier on this page")
    page.failed = str(command)  # cleared below when it passes
    if command.kind == "python":
        run_python(page.work, command.text, str(command), page.env)
    elif command.text == "make train":
        pass  # its recipe ran (tiny) in after_make_train, making the workspace every page starts from
    else:
        run_shell(page.work, command.text, str(command), page.env)
    page.failed = None
    workspaces.passed[command.text] = str(command)


def test_every_exception_matches_a_command():
    """An exception whose command left the docs would hide nothing but still read as if it did."""
    for page, pattern, reason in EXCEPTIONS:
        assert any(c.path == page and re.search(pattern, c.text) for c in COMMANDS), (page, pattern, reason)


def test_make_train_recipe_is_read():
    recipe = make_recipe("train")
    assert any(re.match(r"\.venv/bin/neox train configs/tiny-cpu\.yml\b", c) for c in recipe), recipe
    assert not any("$(" in c for c in recipe), recipe
