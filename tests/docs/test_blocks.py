"""What tests/docs/blocks.py takes from a page, against a hand-written page and the commands read off it by eye."""

from __future__ import annotations

from tests.docs.blocks import fenced_blocks, page_commands

PAGE = """\
# A page

Inline `neox train x.yml` is never run.

```bash
neox preprocess --input a.jsonl \\
    --output-prefix data/a   # a comment after the command
# a comment line

neox train configs/tiny-cpu.yml
```

```console
$ neox info configs/tiny-cpu.yml
parameters: 4.3M
$ ls runs
```

- In a list:

  ```python
  import neox
  print(neox.__version__)
  ```

```
neox train: error: run.yml: world size 6 is not divisible by ...
```

```
neox train cfg.yml --nproc 8
```

```yaml
train_iters: 5
```

```text
runs/tiny-cpu/
  latest
```
"""


def test_commands_of_a_hand_written_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    got = [(c.line, c.kind, c.text) for c in page_commands(page, tmp_path)]
    assert got == [
        (6, "shell", "neox preprocess --input a.jsonl --output-prefix data/a   # a comment after the command"),
        (10, "shell", "neox train configs/tiny-cpu.yml"),
        (14, "shell", "neox info configs/tiny-cpu.yml"),
        (16, "shell", "ls runs"),
        (21, "python", "import neox\nprint(neox.__version__)\n"),
        (31, "shell", "neox train cfg.yml --nproc 8"),
    ]


def test_block_kinds():
    kinds = [(b.line, b.kind) for b in fenced_blocks(PAGE)]
    # bash, console, python (indented in a list), untagged output, untagged command, yaml, text
    assert kinds == [
        (5, "shell"),
        (13, "console"),
        (21, "python"),
        (26, "text"),
        (30, "shell"),
        (34, "text"),
        (38, "text"),
    ]


def test_an_unclosed_fence_runs_to_the_end():
    blocks = fenced_blocks("```sh\nneox info a.yml\n")
    assert [(b.kind, b.body) for b in blocks] == [("shell", ["neox info a.yml"])]
