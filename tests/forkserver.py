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

In "worker" mode the server stands for `python -u SCRIPT ARGS...`, the program torchrun starts for each rank
(tests/parallel/dist_helpers.py passes it as torchrun's --no-python program): the child runs the script as
`__main__` with its folder first on sys.path, stdout and stderr unbuffered, torchrun's rank variables in its
environment (TORCHRUN, read when the process group starts). A child whose program is killed (SIGKILL cannot be
passed on) kills itself, so a timed-out launch leaves no rank behind.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
# what torchrun workers (tests/parallel's worker scripts) import: torch.distributed's pieces and neox's trainer
WORKER_PRELOAD = [
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor.parallel",
    "torch.distributed.pipelining",
    "neox.train.trainer",
    "neox.train.distributed",
    "tests.parallel.dist_helpers",
]
# read by neox when a command runs (never while importing), set by the shell for each command, or by pytest for
# each test
RUNTIME_ONLY = {"NEOX_EVAL_DATA", "NEOX_CORPUS_MIRROR", "PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST"}
# what torchrun adds to each worker's environment (read by torch.distributed when a process group starts)
TORCHRUN = {
    *("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
    *("GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"),
    *("TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID"),
    *("TORCHELASTIC_SIGNALS_TO_HANDLE", "TORCHELASTIC_USE_AGENT_STORE"),
}
MODES = {"neox": (PRELOAD, RUNTIME_ONLY), "worker": (WORKER_PRELOAD, RUNTIME_ONLY | TORCHRUN)}
START_TIMEOUT_S = 300

# The `neox` the commands find first on PATH. Standard library only (no torch: it starts in milliseconds).
SHIM = r"""#!{python}
import json, os, signal, socket, sys

REAL, SOCKET_ENV, SHIM_DIR = {real!r}, {socket_env!r}, {shim_dir!r}  # REAL: the program this stands for
env = dict(os.environ)
path = env.pop(SOCKET_ENV, None)
env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != SHIM_DIR)


def real():
    os.execve(REAL[0], [*REAL, *sys.argv[1:]], env)


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


def _watch(conn: socket.socket) -> None:
    """In a child: end at once (SIGKILL) when its shim is gone, killed by a caller that waits for nothing."""
    with contextlib.suppress(OSError):
        while conn.recv(16):
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _unbuffered() -> None:
    """`python -u`, which torchrun runs workers with: stdout and stderr written through at once."""
    for name in ("stdout", "stderr"):
        old = getattr(sys, name)
        raw = io.FileIO(old.fileno(), "w", closefd=False)
        setattr(sys, name, io.TextIOWrapper(raw, encoding=old.encoding, errors=old.errors, write_through=True))


def _serve(path: str, mode: str) -> int | None:
    """The server's loop: returns None when told to stop, or, in a forked child, the command's exit code."""
    import neox.cli

    preload, runtime_only = MODES[mode]

    initial = dict(os.environ)
    # what neox.cli.main does before a command imports torch, done here as there: `neox info --help` runs it
    # and imports no torch
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.suppress(SystemExit):
        neox.cli.main(["info", "--help"])
    assert "torch" not in sys.modules, "`neox info --help` imported torch: the fork server cannot start as neox"
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.parallel
    for name in preload:
        importlib.import_module(name)
    del sys.path[1]
    base = {k: v for k, v in initial.items() if k not in runtime_only}
    # what neox set for itself before torch loaded (an allocator switch), as a fresh `neox` process would have
    added = {k: v for k, v in os.environ.items() if k not in initial}
    # the imported objects out of the collector's reach: a child's collections (and its exit's) would otherwise
    # touch every one of them, copying the server's whole heap page by page (2.3 s an exit, 0.5 s frozen)
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    log = open(Path(path).with_name("requests.log"), "a")  # one line a request: forked or sent to the real program
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
            if len(fds) != 3 or {k: v for k, v in env.items() if k not in runtime_only} != base:
                for fd in fds:
                    os.close(fd)
                differing = sorted(k for k in {*env, *base} - runtime_only if env.get(k) != base.get(k))
                print("real", request["argv"][:1], "environment differs:", differing, file=log, flush=True)
                conn.sendall(b"real\n")
                conn.close()
                continue
            print("fork", request["argv"][:1], file=log, flush=True)
            pid = os.fork()
            if pid == 0:
                server.close()
                log.close()
                for other in children.values():
                    other.close()
                threading.Thread(target=_watch, args=(conn,), daemon=True).start()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(env)
                for key, value in added.items():
                    os.environ.setdefault(key, value)
                if mode == "neox":
                    sys.argv = [str(REAL_NEOX), *request["argv"]]
                    return neox.cli.main(request["argv"])
                # `python -u SCRIPT ARGS...`: the script's folder first on sys.path, run as __main__
                _unbuffered()
                sys.argv = list(request["argv"])
                sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
                runpy.run_path(sys.argv[0], run_name="__main__")
                return 0
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
    """A running server and its folder (the program, the socket, requests.log: a line a request, forked or run
    fresh, and why); `close()` stops it (children still running finish); the folder stays, like pytest's own."""

    def __init__(self, env: dict[str, str], cwd: Path, mode: str = "neox"):
        self.folder = Path(tempfile.mkdtemp(prefix="neox-fork-"))
        self.socket = str(self.folder / "socket")
        self.bin = self.folder / "bin"
        self.bin.mkdir()
        # "neox": stands for the console script; "worker": for `python -u`, torchrun's --no-python program
        self.program = self.bin / ("neox" if mode == "neox" else "python-u")
        real = [str(REAL_NEOX)] if mode == "neox" else [sys.executable, "-u"]
        self.program.write_text(
            SHIM.format(python=sys.executable, real=real, socket_env=SOCKET_ENV, shim_dir=str(self.bin))
        )
        self.program.chmod(0o755)
        # run as the console script runs: its own folder first on sys.path (a script's path would put tests/ there,
        # whose kernels/ hides the `kernels` package transformers imports)
        start = (
            f"import runpy, sys; sys.path[0] = {str(REAL_NEOX.parent)!r}; "
            f"runpy.run_path({__file__!r}, run_name='__main__')"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", start, self.socket, mode],
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
    rc = _serve(sys.argv[1], sys.argv[2])
    if rc is not None:  # a forked child: end as `neox` ends, atexit handlers and stream flushes included
        sys.exit(rc)
