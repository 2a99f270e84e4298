"""Launcher: flags, hostfile and Slurm resolve to the right torchrun command lines (no processes started)."""

from __future__ import annotations

import argparse
import socket

import pytest

from neox.errors import NeoxError
from neox.parallel import launch


def parse(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("configs", nargs="*")
    launch.add_arguments(p)
    return p.parse_args(list(argv))


def test_single_process_does_not_launch(monkeypatch):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launch.launch(parse("a.yml"), ["train", "a.yml"]) is None


def test_worker_argv_drops_launch_flags():
    argv = ["train", "a.yml", "--nproc", "4", "--max-restarts=1", "b.yml", "--print-launch", "--hostfile", "h"]
    assert launch.worker_argv(argv) == ["train", "a.yml", "b.yml"]


def test_single_node_uses_standalone_rendezvous_and_trap_b(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    seen = []
    args = parse("a.yml", "--nproc", "4", "--max-restarts", "2", "--print-launch")
    assert (
        launch.launch(
            args, ["train", "a.yml", "--nproc", "4", "--max-restarts", "2", "--print-launch"], validate=seen.append
        )
        == 0
    )
    out = capsys.readouterr().out.strip()
    assert seen == [4]
    assert "--nproc-per-node=4" in out and "--max-restarts=2" in out and "--standalone" in out
    assert out.endswith("-m neox.cli train a.yml")
    assert launch.worker_env({})["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_validation_error_stops_the_launch(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def bad(world):
        raise NeoxError(f"world size {world} is not divisible")

    with pytest.raises(NeoxError, match="world size 3"):
        launch.launch(parse("--nproc", "3"), ["train", "--nproc", "3"], validate=bad)


def test_multi_node_flags():
    plan = launch.plan_from_args(
        parse("--nproc", "2", "--nnodes", "3", "--node-rank", "1", "--master-addr", "n0", "--master-port", "1234"),
        environ={},
    )
    cmd = launch.commands(plan, ["train", "a.yml"])[0]
    assert plan.world_size == 6
    for flag in ("--nnodes=3", "--node-rank=1", "--master-addr=n0", "--master-port=1234"):
        assert flag in cmd
    with pytest.raises(NeoxError, match="needs --node-rank and --master-addr"):
        launch.plan_from_args(parse("--nnodes", "2"), environ={})
    with pytest.raises(NeoxError, match="outside 0..1"):
        launch.plan_from_args(parse("--nnodes", "2", "--node-rank", "2", "--master-addr", "x"), environ={})


def test_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# cluster\nlocalhost slots=2\nworker-1 slots=2  # second box\n\n")
    plan = launch.plan_from_args(parse("--hostfile", str(hf)), environ={})
    assert (plan.nproc, plan.nnodes, plan.master_addr, plan.hosts) == (2, 2, "localhost", ("localhost", "worker-1"))
    local, remote = launch.commands(plan, ["train", "a.yml"])
    assert "--node-rank=0" in local and local[0] != "ssh"
    assert remote[:4] == ["ssh", "-o", "BatchMode=yes", "worker-1"] and "--node-rank=1" in remote[4]
    assert f"--master-addr={socket.getfqdn()}" in remote[4]  # not "localhost": worker-1 must reach it
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in remote[4]


@pytest.mark.parametrize(
    "text,msg",
    [
        ("a slots=0\n", "expected 'HOST slots=N'"),
        ("a\n", "expected"),
        ("a slots=1\na slots=1\n", "listed twice"),
        ("# none\n", "lists no hosts"),
        ("a slots=1\nb slots=2\n", "different slots"),
    ],
)
def test_bad_hostfile(tmp_path, text, msg):
    hf = tmp_path / "hostfile"
    hf.write_text(text)
    with pytest.raises(NeoxError, match=msg):
        launch.plan_from_args(parse("--hostfile", str(hf)), environ={})


def test_slurm_environment():
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[007-009],login1"}
    plan = launch.plan_from_args(parse("--nproc", "8"), environ=env)
    assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.world_size) == (3, 2, "gpu007", 24)


def test_expand_nodelist():
    assert launch.expand_nodelist("n[1-3,10],x,y[08-09]") == ["n1", "n2", "n3", "n10", "x", "y08", "y09"]


def test_resume_dir_after_elastic_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert launch.resume_dir(None, str(tmp_path)) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert launch.resume_dir(None, str(tmp_path)) is None  # nothing saved yet: start fresh
    (tmp_path / "latest").write_text("iter_0000002")
    assert launch.resume_dir(None, str(tmp_path)) == str(tmp_path)
    assert launch.resume_dir("other", str(tmp_path)) == "other"


def test_neox_train_refuses_a_bad_layout_before_starting_torchrun(tmp_path, capsys, monkeypatch):
    from neox.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: started.append(a))
    cfg = tmp_path / "run.yml"
    cfg.write_text(
        "num_layers: 2\nhidden_size: 32\nnum_attention_heads: 4\nmodel_parallel_size: 2\n"
        f"data_path: {tmp_path / 'x_text_document'}\n"
    )
    assert main(["train", str(cfg), "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: world size 3 is not divisible" in err
    assert not started


def test_pipeline_schedule_errors_come_before_the_launch(tmp_path, monkeypatch, capsys):
    """`neox train --nproc N` checks the schedule against the batch triple at that data-parallel size, before
    torchrun starts, instead of every rank failing at Trainer start."""
    from neox.cli import main
    from neox.commands.train import check_layout
    from neox.config import from_dict
    from neox.errors import ConfigError

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    model = {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 64}
    cfg = from_dict(
        {
            "model": model,
            "parallel": {"pipe_parallel_size": 2, "pipe_schedule": "1f1b"},
            "train": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
        }
    )
    with pytest.raises(ConfigError, match=r"1f1b needs gradient_accumulation_steps >= pipe_parallel_size \(1 < 2\)"):
        check_layout(cfg, 2, "a.yml")
    check_layout(
        from_dict(
            {
                **{"model": model},
                "parallel": {"pipe_parallel_size": 2, "pipe_schedule": "gpipe"},
                "train": {"train_micro_batch_size_per_gpu": 2},
            }
        ),
        2,
        "a.yml",
    )

    (tmp_path / "c.txt").write_text("some text to train on\n" * 20)
    assert (
        main(["preprocess", "--input", str(tmp_path / "c.txt"), "--output-prefix", str(tmp_path / "c"), "--quiet"]) == 0
    )
    yml = tmp_path / "pp.yml"
    yml.write_text(
        f"data-path: {tmp_path / 'c_text_document'}\n"
        "num-layers: 4\nhidden-size: 32\nnum-attention-heads: 4\nseq-length: 16\npipe-parallel-size: 2\n"
        "pipe-schedule: 1f1b\ntrain_micro_batch_size_per_gpu: 2\ngradient_accumulation_steps: 1\n"
        "train-iters: 2\n"
    )
    assert main(["train", str(yml), "--nproc", "2", "--print-launch"]) == 2
    captured = capsys.readouterr()
    assert "1f1b needs gradient_accumulation_steps" in captured.err and "torch.distributed.run" not in captured.out
