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
    # the shared copy has the eval data folder's layout: every local task finds its files there
    assert eval_tasks.find_data_dir(eval_tasks.local_task_names(), shared_data) == shared_data.resolve()


def test_data_folder_comes_from_the_flag_the_variable_or_the_cache(tmp_path, monkeypatch):
    for var in ("NEOX_EVAL_DATA", "NEOX_SHARED_DATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert eval_tasks.find_data_dir() == tmp_path / "cache" / "neox" / "eval-data"
    monkeypatch.setenv("NEOX_SHARED_DATA", str(tmp_path / "old"))  # the variable's earlier name
    assert eval_tasks.find_data_dir() == tmp_path / "old"
    monkeypatch.setenv("NEOX_EVAL_DATA", "rel")
    assert eval_tasks.find_data_dir() == tmp_path / "rel"
    assert eval_tasks.find_data_dir([], tmp_path / "flag") == tmp_path / "flag"


def test_missing_data_names_the_file_and_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOX_EVAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(NeoxError, match=r"lambada_gen_local: .*/eval/lambada_openai_test.jsonl is missing; run "):
        eval_tasks.find_data_dir(["lambada_gen_local"])
    with pytest.raises(NeoxError, match=r"`neox prepare wikitext2`.*\$NEOX_EVAL_DATA"):
        eval_tasks.local_task_dirs(["hellaswag", "wikitext2_local"])
