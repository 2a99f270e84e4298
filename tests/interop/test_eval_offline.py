"""`neox eval` without the task data: a Hub task that cannot be fetched, a local task whose data is missing, and
the local tasks reading the eval data folder that `neox prepare` fills (downloads from a server on 127.0.0.1)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from neox.cli import main as cli
from neox.data.corpora import EVAL_SETS, eval_set_for
from neox.interop.eval_tasks import data_files, local_task_names
from neox.interop.lm_eval import fetch_failure, fetch_failure_message
from tests.conftest import ROOT
from tests.infer.tiny import make_run, tiny_config

pytest.importorskip("lm_eval")

HF_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME")


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request 404 (no such dataset) and records its path; serves ``server.files`` by name."""

    def _answer(self, body: bool):
        self.server.paths.append(self.path)
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.paths, srv.files = [], {}
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("eval") / "run", tiny_config())


def _neox_eval(args, tmp_path, **env):
    """`neox eval ...` in a fresh process with an empty HF cache and only the given HF variables."""
    base = {k: v for k, v in os.environ.items() if k not in HF_ENV}
    base.update(HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "neox.cli", "eval", *args]
    return subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, text=True, timeout=300)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("neox eval: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    return errors[0]


def test_hub_task_with_offline_mode_set_is_one_line(run_dir, tmp_path):
    # the user's command from the issue, on a machine where HF offline mode is on (as neox used to force it)
    proc = _neox_eval(
        [str(run_dir), "--tasks", "lambada_openai", "--limit", "2"],
        tmp_path,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    line = _one_line_error(proc)
    assert "--tasks lambada_openai: the harness could not fetch the task data" in line
    assert "OfflineModeIsEnabled" in line
    assert "use lambada_openai_local (data: `neox prepare lambada`)" in line and "--include-path DIR" in line


@pytest.mark.slow
def test_hub_task_is_fetched_when_offline_mode_is_not_set(run_dir, tmp_path, server):
    # HF_ENDPOINT points the Hub client at a local server that has no datasets: neox no longer forces offline
    # mode, so the harness asks for the dataset (the request arrives) and its 404 becomes the one-line error.
    proc = _neox_eval([str(run_dir), "--tasks", "lambada_openai", "--limit", "2"], tmp_path, HF_ENDPOINT=server.base)
    assert any("EleutherAI/lambada_openai" in p for p in server.paths), server.paths
    line = _one_line_error(proc)
    assert "could not fetch the task data" in line and "lambada_openai" in line and "--include-path" in line


def test_local_task_without_data_names_the_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEOX_EVAL_DATA", str(tmp_path / "empty"))
    # checked before the checkpoint is read: the missing data is reported even for a wrong checkpoint path
    rc = cli(["eval", str(tmp_path / "no-run"), "--tasks", "piqa_local"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert f"{tmp_path / 'empty' / 'eval' / 'piqa_valid_labeled.jsonl'} is missing" in err
    assert "`neox prepare piqa`" in err and "$NEOX_EVAL_DATA" in err
    rc = cli(["eval", str(tmp_path / "no-run"), "--tasks", "wikitext2_local", "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "`neox prepare wikitext2`" in err and "point --data-dir at" in err


def test_every_local_task_reads_files_an_eval_set_downloads():
    for task in local_task_names():
        files = data_files(task)
        assert files and all(eval_set_for(f) in EVAL_SETS for f in files), task


def test_fetch_failures_are_told_from_other_errors():
    class OfflineModeIsEnabled(ConnectionError):  # huggingface_hub's, by name
        pass

    outer = ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)")
    outer.__cause__ = OfflineModeIsEnabled("offline")
    wrapped = RuntimeError("while building the task")
    wrapped.__context__ = outer
    assert fetch_failure(wrapped) is outer
    assert fetch_failure(ValueError("bad metric")) is None
    assert fetch_failure(FileNotFoundError("Unable to find '/x.jsonl'")) is not None
    msg = fetch_failure_message(["piqa", "hellaswag"], outer)
    assert msg.count("\n") == 0 and "(Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled))" in msg
    assert "use piqa_local (data: `neox prepare piqa`)" in msg


@pytest.mark.slow
def test_prepare_then_eval_a_local_task_with_stderr(run_dir, tmp_path, server, shared_data, capsys):
    # `neox prepare lambada` from a mirror serving the upstream file name, then the local task reads it
    server.files["lambada_test.jsonl"] = (shared_data / "eval" / "lambada_openai_test.jsonl").read_bytes()
    data = tmp_path / "eval-data"
    assert cli(["prepare", "lambada", "--out", str(data), "--mirror", server.base, "--quiet"]) == 0
    assert f"--data-dir {data}" in capsys.readouterr().err
    out = tmp_path / "out"
    args = ["eval", str(run_dir), "--tasks", "lambada_openai_local", "--limit", "4", "--data-dir", str(data)]
    assert cli([*args, "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    task = res["results"]["lambada_openai_local"]
    # the harness's default bootstrap: a closed-form stderr for acc, a bootstrapped one for perplexity
    assert res["config"]["bootstrap_iters"] == 100000
    assert isinstance(task["acc_stderr,none"], float) and isinstance(task["perplexity_stderr,none"], float)
    rows = [line.split() for line in (out / "results.txt").read_text().splitlines()[2:]]
    assert {r[1] for r in rows} == {"acc", "perplexity"} and all(len(r) == 4 for r in rows)
    data_file = res["configs"]["lambada_openai_local"]["dataset_kwargs"]["data_files"]["test"]
    assert data_file == str(data / "eval" / "lambada_openai_test.jsonl")
