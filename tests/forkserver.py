"""A fork server for tests that run many `neox ...` commands: a process that has imported neox's command modules
and torch once (and run nothing) forks each command, instead of every command paying for a fresh `import torch`
(2-4 s on two shared cores).

`ForkServer(env, cwd)` starts the server with the environment the commands will get. Its `bin` folder holds a
`neox` that is the same program from a caller's point of view: put first on PATH (`ForkServer.path_env`), it hands
its arguments, working directory, environment and its stdin, stdout and stderr (the descriptors themselves) to the
server, whose forked child runs `neox.cli.main` on them exactly as the console script does, and exits with the
child's exit status (a signal's too). The child starts where a fresh process would: the environment is the
command's, `sys.argv[0]` is the console script's path, Python's `random` is reseeded (by `random` itself at
fork), atexit handlers run at its end. What a fresh process reads while importing could still differ, so a
command whose environment differs from the server's in anything but RUNTIME_ONLY (read when a command runs, not
at import), or that finds no server, runs the real console script instead. A command under `--nproc` forks the
same way: the forked launcher starts torchrun and fresh worker interpreters, as the real command does.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL_NEOX = Path(sys.executable).parent / "neox"
SOCKET_ENV = "NEOX_TEST_FORKSERVER"
# neox's command modules whose imports (torch, numpy, safetensors, lm_eval's top level) the children share
PRELOAD = [
    "neox.commands.train",
    "neox.commands.generate",
    "neox.commands.eval",
    "neox.commands.hf",
    "neox.commands.preprocess",
    "neox.commands.data",
    "neox.commands.checkpoint",
    "neox.commands.distill",
    "neox.commands.score",
    "neox.commands.prepare",
    "neox.commands.info",
    "neox.commands.config",
]
# read by neox when a command runs (never while importing), or set by the shell for each command
RUNTIME_ONLY = {"NEOX_EVAL_DATA", "NEOX_CORPUS_MIRROR", "PWD", "OLDPWD", "SHLVL", "_"}
START_TIMEOUT_S = 300

# The `neox` the commands find first on PATH. Standard library only (no torch: it starts in milliseconds).
SHIM = r"""#!{python}
import json, os, signal, socket, sys

REAL, SOCKET_ENV, SHIM_DIR = {real!r}, {socket_env!r}, {shim_dir!r}
env = dict(os.environ)
path = env.pop(SOCKET_ENV, None)
env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != SHIM_DIR)


def real():
    os.execve(REAL, [REAL, *sys.argv[1:]], env)


if not path:
    real()
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(path)
    request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}}).encode()
    socket.send_fds(conn, [request], [0, 1, 2])
    answer = conn.makefile("r")
    first = answer.readline().strip()
except OSError:
    real()
if first == "real":
    real()
pid = int(first)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda s, _: os.kill(pid, s))
rc = int(answer.readline() or 1)
if rc < 0:
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
"""


def _serve(path: str) -> int | None:
    """The server's loop: returns None when told to stop, or, in a forked child, the command's exit code."""
    import neox.cli

    initial = dict(os.environ)
    # what neox.cli.main does before a command imports torch, done here as there: `neox info --help` runs it
    # and imports no torch
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.suppress(SystemExit):
        neox.cli.main(["info", "--help"])
    assert "torch" not in sys.modules, "`neox info --help` imported torch: the fork server cannot start as neox"
    for name in PRELOAD:
        importlib.import_module(name)
    base = {k: v for k, v in initial.items() if k not in RUNTIME_ONLY}
    # what neox set for itself before torch loaded (an allocator switch), as a fresh `neox` process would have
    added = {k: v for k, v in os.environ.items() if k not in initial}
    # the imported objects out of the collector's reach: a child's collections (and its exit's) would otherwise
    # touch every one of them, copying the server's whole heap page by page (2.3 s an exit, 0.5 s frozen)
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([server, sys.stdin], [], [], 0.02)
        if sys.stdin in ready and not sys.stdin.readline():  # the test closed our stdin: stop
            server.close()
            return None
        if server in ready:
            conn, _ = server.accept()
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(data)
            env = request["env"]
            if len(fds) != 3 or {k: v for k, v in env.items() if k not in RUNTIME_ONLY} != base:
                for fd in fds:
                    os.close(fd)
                conn.sendall(b"real\n")
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                for other in children.values():
                    other.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(env)
                for key, value in added.items():
                    os.environ.setdefault(key, value)
                sys.argv = [str(REAL_NEOX), *request["argv"]]
                return neox.cli.main(request["argv"])
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            with contextlib.suppress(OSError):  # the shim is gone (its caller killed it)
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


class ForkServer:
    """A running server and the folder of its `neox`; `close()` stops it (children still running finish)."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="neox-fork-"))
        self.socket = str(self.folder / "socket")
        self.bin = self.folder / "bin"
        self.bin.mkdir()
        shim = self.bin / "neox"
        shim.write_text(
            SHIM.format(python=sys.executable, real=str(REAL_NEOX), socket_env=SOCKET_ENV, shim_dir=str(self.bin))
        )
        shim.chmod(0o755)
        # run as the console script runs: its own folder first on sys.path (a script's path would put tests/ there,
        # whose kernels/ hides the `kernels` package transformers imports)
        start = (
            f"import runpy, sys; sys.path[0] = {str(REAL_NEOX.parent)!r}; "
            f"runpy.run_path({__file__!r}, run_name='__main__')"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", start, self.socket],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        assert line.strip() == "ready", f"the fork server did not start (rc {self.proc.poll()})"

    def path_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` (the server's, give or take RUNTIME_ONLY) with this server's `neox` first on PATH."""
        return {**env, "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}", SOCKET_ENV: self.socket}

    def close(self) -> None:
        self.proc.stdin.close()
        end = time.monotonic() + 30
        while self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    rc = _serve(sys.argv[1])
    if rc is not None:  # a forked child: end as `neox` ends, atexit handlers and stream flushes included
        sys.exit(rc)
