"""Huge pages for large CPU tensors: set before torch loads, fewer page faults, reference engines left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from neox.bench import run as bench_run
from neox.kernels import host_memory as hm

# In a fresh interpreter (the switch is read when torch loads): allocate and fill a 64 MiB tensor a few times,
# then count the minor page faults that filling one more costs.
PROBE = r"""
import resource, torch
for _ in range(3):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (64 << 20) // 4096


def _faults(switch: str) -> int:
    env = {**os.environ, hm.THP_ENV: switch}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(
    hm.kernel_huge_pages() not in ("always", "madvise"), reason="the kernel's transparent huge pages are off"
)
def test_huge_pages_cut_the_faults_of_a_fresh_block():
    assert _faults("1") < PAGES // 8  # a fault per 2 MiB (plus a few 4 KiB ones), not per 4 KiB
    if hm.kernel_huge_pages() == "madvise":  # without the advice, 4 KiB pages
        assert _faults("0") > PAGES // 2


def test_the_switch_is_set_before_torch_loads_and_never_over_the_users_choice():
    script = (
        "import os, sys\n"
        "from neox.kernels.host_memory import THP_ENV, use_huge_pages\n"
        "if sys.argv[1] == 'late':\n"
        "    import torch\n"
        "print(use_huge_pages(), os.environ.get(THP_ENV))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != hm.THP_ENV}

    def run(mode, **extra):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env={**env, **extra})
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run("early") == ["True", "1"]
    assert run("late") == ["False", "None"]  # too late for this process: say so, change nothing
    assert run("early", **{hm.THP_ENV: "0"}) == ["False", "0"]
    child = {}
    assert hm.use_huge_pages(child) and child == {hm.THP_ENV: "1"}
    assert not hm.use_huge_pages({hm.THP_ENV: "0"})


def test_neox_cli_turns_it_on_for_its_commands():
    script = "import os, neox.cli\ntry:\n    neox.cli.main(['info', '--help'])\nexcept SystemExit:\n    pass\n"
    script += "print('SWITCH', os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != hm.THP_ENV}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "SWITCH 1" in out.stdout, out.stderr


def test_bench_children_neox_engines_get_it_reference_engines_as_users_run_them(monkeypatch):
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen[cmd[-1]] = env
        return subprocess.CompletedProcess(cmd, 1, "", "stopped here")

    monkeypatch.setattr(bench_run.subprocess, "run", fake_run)
    monkeypatch.setenv(hm.THP_ENV, "1")
    monkeypatch.setattr(hm, "_set_here", [True])  # as `neox bench` started: the switch is neox's, not the user's
    neox_rec = bench_run.run_child("generate", {"engine": "neox"}, 1, 10)
    hf_rec = bench_run.run_child("generate", {"engine": "hf"}, 1, 10)
    assert neox_rec["huge_pages"] and not hf_rec["huge_pages"]
    envs = list(seen.values())
    assert envs[0][hm.THP_ENV] == "1" and hm.THP_ENV not in envs[1]


def test_kernel_mode_is_read_from_sysfs(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hm.kernel_huge_pages(str(f)) == "madvise"
    assert hm.kernel_huge_pages(str(tmp_path / "absent")) is None
