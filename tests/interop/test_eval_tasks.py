import pytest
import yaml

from neox.errors import NeoxError
from neox.interop import eval_tasks


def test_templates_are_filled_with_the_data_path(shared_data):
    out = eval_tasks.materialize(shared_data)
    names = sorted(p.stem for p in out.glob("*.yaml"))
    assert names == eval_tasks.local_task_names() and "piqa_local" in names
    piqa = yaml.safe_load((out / "piqa_local.yaml").read_text())
    path = piqa["dataset_kwargs"]["data_files"]["validation"]
    assert path == str(shared_data.resolve() / "eval" / "piqa_valid_labeled.jsonl")
    assert eval_tasks.local_task_dirs(["hellaswag"]) == []


def test_missing_data_dir_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOX_SHARED_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(eval_tasks, "__file__", str(tmp_path / "a" / "b" / "c" / "eval_tasks.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NeoxError, match="NEOX_SHARED_DATA"):
        eval_tasks.find_data_dir()
