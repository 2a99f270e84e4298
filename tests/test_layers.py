"""The package's layering, beyond what import-linter checks: neox modules are imported at module level.

import-linter (`make lint`) enforces the layer order, but it counts an import inside a function like any
other; a function-level import of a neox module is how a cycle gets hidden, so none is allowed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import neox

PACKAGE = Path(neox.__file__).parent
# `import neox` stays free of torch: neox.load imports the inference API when it is first called
ALLOWED = {("__init__.py", "neox.infer.api")}


def _function_imports(tree: ast.AST):
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "neox":
                yield node.lineno, node.module
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "neox":
                        yield node.lineno, alias.name


def test_no_neox_import_inside_a_function():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, module in _function_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if (rel, module) not in ALLOWED:
                found.append(f"neox/{rel}:{line}: {module}")
    assert not found, "imports of neox modules inside functions (move them to module level):\n" + "\n".join(found)


def test_the_walk_sees_function_imports():
    src = "def f():\n    from neox.config import load\n    import neox.model\n"
    assert list(_function_imports(ast.parse(src))) == [(2, "neox.config"), (3, "neox.model")]


def test_core_commands_import_no_optional_extra():
    """`make train` installs only the core package: the commands it runs (and the other core ones) must import
    without lm-eval, transformers, sentencepiece or tiktoken, the optional extras."""
    core = ["prepare", "preprocess", "tokenizer", "data", "info", "train", "checkpoint", "generate", "config"]
    code = (
        "import sys\n"
        f"for c in {core!r}: __import__('neox.commands.' + c)\n"
        "print(sorted(m for m in ('lm_eval', 'transformers', 'sentencepiece', 'tiktoken') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
