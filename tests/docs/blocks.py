"""The runnable parts of a Markdown page: fenced shell and Python blocks, split into the commands a reader types.

- ```bash, ```sh, ```shell, ```zsh: every line is input; a line ending in a backslash continues on the next;
  blank lines and comment lines are not commands.
- ```console: only lines starting with ``$ `` are input (the rest is output).
- ```python / ```py: the whole block is one snippet.
- A block without a language tag is read as shell when its first line is a command (``neox train ...``,
  ``python ...``, ``torchrun ...``; not ``neox train: error: ...``, which is output), and as text otherwise.
- Any other tag (``text``, ``yaml``, ...) is shown, not run. Inline `code` is never run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SHELL_TAGS = {"bash", "sh", "shell", "zsh"}
PYTHON_TAGS = {"python", "py"}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<tag>[^\s`{]*)")
# the first line of an untagged block that is a command: optional VAR=value prefixes, then a program; `neox` must be
# followed by a subcommand word and a space (so `neox train: error: ...`, an error message shown as output, is not one)
_COMMAND_LINE = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    r"(?:neox\s+[a-z][\w-]*(?:\s|$)|python3?\s|torchrun\s|srun\s|sbatch\s|make(?:\s|$)|\.venv/bin/\S+(?:\s|$))"
)


@dataclass(frozen=True)
class Block:
    """One fenced block: its kind ('shell', 'python' or 'text'), the Markdown line of its opening fence, its body."""

    kind: str
    line: int
    body: list[str]


@dataclass(frozen=True)
class Command:
    """One thing to run: a shell command line (continuations joined) or a whole Python snippet."""

    path: str  # the page, relative to the repository root
    line: int  # Markdown line where it starts
    kind: str  # 'shell' or 'python'
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, in order; an unclosed fence runs to the end of the text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, tag = len(m["indent"]), m["fence"], m["tag"].lower()
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            # a block inside a list item is indented as the fence is; that indentation is not part of the text
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        i += 1
        blocks.append(Block(_kind(tag, body), start, body))
    return blocks


def _kind(tag: str, body: list[str]) -> str:
    if tag in SHELL_TAGS:
        return "shell"
    if tag == "console":
        return "console"
    if tag in PYTHON_TAGS:
        return "python"
    if tag == "":
        first = next((line for line in body if line.strip()), "")
        return "shell" if _COMMAND_LINE.match(first) else "text"
    return "text"


def shell_commands(block: Block, path: str) -> list[Command]:
    """The commands of a shell or console block, each with the Markdown line it starts on."""
    commands, pending, pending_line = [], [], 0
    for offset, raw in enumerate(block.body):
        line_no = block.line + 1 + offset
        if block.kind == "console" and not pending:
            if not raw.startswith("$ "):
                continue  # output
            raw = raw[2:]
        if not pending:
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            pending_line = line_no
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1].rstrip())
            continue
        pending.append(raw.strip() if pending else raw.rstrip())
        commands.append(Command(path, pending_line, "shell", " ".join(p.strip() for p in pending)))
        pending = []
    if pending:
        commands.append(Command(path, pending_line, "shell", " ".join(p.strip() for p in pending)))
    return commands


def page_commands(page: Path, root: Path) -> list[Command]:
    """Everything runnable on one page, in page order."""
    path = page.relative_to(root).as_posix()
    commands = []
    for block in fenced_blocks(page.read_text(encoding="utf-8")):
        if block.kind in ("shell", "console"):
            commands.extend(shell_commands(block, path))
        elif block.kind == "python":
            commands.append(Command(path, block.line, "python", "\n".join(block.body) + "\n"))
    return commands
