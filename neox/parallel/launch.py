"""Start a command on many processes: torchrun on one node, several nodes (flags, a hostfile, or Slurm).

`neox train CONFIG --nproc N` re-runs itself as `python -m torch.distributed.run ... -m neox.cli train CONFIG`
with the launch flags removed; the workers then see RANK / WORLD_SIZE and build the mesh (neox.parallel.mesh).

Multi-node, three ways:
- flags on every node: `--nnodes 2 --node-rank R --master-addr HOST0 [--master-port P]`;
- a GPT-NeoX / DeepSpeed hostfile (`host slots=N` lines) given once on the first node: each host is started
  over ssh (the local one directly), node rank = line order, master = first host;
- inside a Slurm step (`srun --ntasks-per-node=1 neox train ...`): nodes, node rank and master come from
  SLURM_NNODES, SLURM_NODEID and the first host of SLURM_JOB_NODELIST.

Stopping: SIGTERM, SIGINT and SIGUSR1 sent to this launcher go to torchrun, which passes them to every worker
(`--signals-to-handle` adds SIGUSR1, Slurm's warning signal, to torchrun's list) and gives them the shutdown
grace to save before it kills them. Workers report why they stopped through a status folder
(neox.parallel.worker_status): the launcher exits EXIT_PREEMPTED when they all saved, EXIT_HANG after a hang,
else with torchrun's code. Hosts started over ssh get no signal from here: signal their own launchers.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from neox.errors import NeoxError
from neox.parallel.worker_status import (
    JOB_START_ENV,
    REPEAT_WINDOW_S,
    STATUS_DIR_ENV,
    launcher_exit_code,
    resumable_after_stop,
    worker_pids,
)

# option -> takes a value; these are removed from the worker's command line.
LAUNCH_OPTIONS = {
    "--nproc": True,
    "--nnodes": True,
    "--node-rank": True,
    "--master-addr": True,
    "--master-port": True,
    "--hostfile": True,
    "--max-restarts": True,
    "--print-launch": False,
}
DEFAULT_PORT = 29500
# what torchrun passes on to the workers: its defaults plus SIGUSR1, which would otherwise kill torchrun itself
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def add_arguments(parser) -> None:
    """The launch flags a command that can run distributed accepts (`neox train`)."""
    g = parser.add_argument_group("launch (torchrun)")
    g.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes per node; > 1 starts torchrun (default 1, or the hostfile's slots)",
    )
    g.add_argument("--nnodes", type=int, default=None, help="number of nodes (multi-node without a hostfile)")
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank, 0..nnodes-1")
    g.add_argument("--master-addr", default=None, help="address of node 0 (rendezvous host)")
    g.add_argument("--master-port", type=int, default=None, help=f"rendezvous port (default {DEFAULT_PORT})")
    g.add_argument(
        "--hostfile",
        default=None,
        help="GPT-NeoX/DeepSpeed hostfile ('host slots=N' per line): start every host over ssh",
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart all workers this many times after a failure; they resume from the last checkpoint",
    )
    g.add_argument("--print-launch", action="store_true", help="print the launch command(s) instead of running them")


@dataclass
class Plan:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_PORT
    max_restarts: int = 0
    hosts: tuple = ()  # hostfile hosts, in node-rank order
    shutdown_grace_s: int = 1800  # after a signal, how long torchrun waits for its workers before killing them

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.max_restarts > 0


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """`host slots=N` lines (DeepSpeed / GPT-NeoX format); blank lines and # comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise NeoxError(f"hostfile {path} does not exist")
    hosts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise NeoxError(f"{path}:{n}: expected 'HOST slots=N' with N >= 1, got {line!r}")
        if any(h == m.group(1) for h, _ in hosts):
            raise NeoxError(f"{path}:{n}: host {m.group(1)} is listed twice")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise NeoxError(f"hostfile {path} lists no hosts")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1") as hosts, without needing `scontrol`."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}")
    return hosts


def plan_from_args(args, environ=None) -> Plan:
    """Resolve flags, hostfile and Slurm variables into one Plan (flags win over Slurm)."""
    env = os.environ if environ is None else environ
    for flag, value in (("--nproc", args.nproc), ("--nnodes", args.nnodes)):
        if value is not None and value < 1:  # checked here: the defaulting below reads 0 as "not given"
            raise NeoxError(f"{flag} {value}: must be 1 or more")
    plan = Plan(max_restarts=args.max_restarts or 0)
    if plan.max_restarts < 0:
        raise NeoxError(f"--max-restarts must be >= 0, got {plan.max_restarts}")
    if args.hostfile:
        if args.nnodes or args.node_rank is not None:
            raise NeoxError("--hostfile sets the nodes and node ranks itself; drop --nnodes / --node-rank")
        hosts = parse_hostfile(args.hostfile)
        slots = {s for _, s in hosts}
        if args.nproc is None and len(slots) > 1:
            raise NeoxError(
                f"hostfile {args.hostfile}: hosts have different slots {sorted(slots)}; torchrun "
                f"starts the same number per node, so give --nproc"
            )
        plan.hosts = tuple(h for h, _ in hosts)
        plan.nproc = args.nproc or hosts[0][1]
        plan.nnodes = len(hosts)
        plan.master_addr = args.master_addr or hosts[0][0]
    elif args.nnodes is None and int(env.get("SLURM_NNODES", "1")) > 1 and "SLURM_NODEID" in env:
        plan.nnodes = int(env["SLURM_NNODES"])
        plan.node_rank = int(env["SLURM_NODEID"])
        plan.master_addr = args.master_addr or expand_nodelist(env.get("SLURM_JOB_NODELIST", ""))[0]
        plan.nproc = args.nproc or int(env.get("SLURM_GPUS_ON_NODE", "1"))
    else:
        plan.nproc = args.nproc or 1
        plan.nnodes = args.nnodes or 1
        if plan.nnodes > 1:
            if args.node_rank is None or args.master_addr is None:
                raise NeoxError(
                    "--nnodes > 1 needs --node-rank and --master-addr on every node "
                    "(or use --hostfile, or run inside a Slurm step)"
                )
            plan.node_rank, plan.master_addr = args.node_rank, args.master_addr
    if plan.nproc < 1 or plan.nnodes < 1:
        raise NeoxError(f"--nproc and --nnodes must be >= 1, got {plan.nproc} and {plan.nnodes}")
    if not 0 <= plan.node_rank < plan.nnodes:
        raise NeoxError(f"--node-rank {plan.node_rank} is outside 0..{plan.nnodes - 1}")
    plan.master_port = args.master_port or DEFAULT_PORT
    return plan


def worker_argv(argv: list[str]) -> list[str]:
    """argv with the launch flags (and their values) removed: what each worker runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = LAUNCH_OPTIONS[name] and "=" not in a
            continue
        out.append(a)
    return out


def torchrun_argv(plan: Plan, node_rank: int, cmd: list[str]) -> list[str]:
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={plan.nproc}",
        f"--max-restarts={plan.max_restarts}",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
        f"--shutdown-timeout={plan.shutdown_grace_s}",
    ]
    if plan.nnodes == 1:
        # a private rendezvous on a free port, so concurrent single-node jobs never collide
        base.append("--standalone")
    else:
        base += [
            f"--nnodes={plan.nnodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={plan.master_addr}",
            f"--master-port={plan.master_port}",
        ]
    return base + ["-m", "neox.cli"] + cmd


def worker_env(environ=None) -> dict:
    env = dict(os.environ if environ is None else environ)
    # after a crash, restarted workers sharing the dead attempt's TCPStore dial its addresses and hang or fail
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _is_local(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn())


def commands(plan: Plan, cmd: list[str]) -> list[list[str]]:
    """One command per node this launcher starts: just this node, or every hostfile host."""
    if not plan.hosts:
        return [torchrun_argv(plan, plan.node_rank, cmd)]
    if plan.master_addr in ("localhost", "127.0.0.1") and not all(_is_local(h) for h in plan.hosts):
        # other hosts cannot reach our "localhost": give them a name they can resolve
        plan = replace(plan, master_addr=socket.getfqdn())
    out = []
    for rank, host in enumerate(plan.hosts):
        argv = torchrun_argv(plan, rank, cmd)
        if not _is_local(host):
            keep = " ".join(
                f"{k}={shlex.quote(v)}"
                for k, v in worker_env().items()
                if k in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "OMP_NUM_THREADS", "PYTHONPATH")
            )
            remote = f"cd {shlex.quote(os.getcwd())} && env {keep} {shlex.join(argv)}"
            argv = ["ssh", "-o", "BatchMode=yes", host, remote]
        out.append(argv)
    return out


def launch(args, argv: list[str], validate: Callable[[int], None] | None = None, grace_s: float = 1800) -> int | None:
    """If the flags ask for more than one process, start them and return the exit code; else return None
    and the caller runs in this process. `validate(world_size)` checks the layout before anything starts;
    `grace_s`: after a stop signal, how long the workers may take to save before torchrun kills them."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return None  # already a torchrun worker
    plan = plan_from_args(args)
    if not plan.distributed and not args.print_launch:
        return None
    if validate is not None:
        validate(plan.world_size)
    plan.shutdown_grace_s = max(1, math.ceil(grace_s))
    cmds = commands(plan, worker_argv(argv))
    if args.print_launch:
        for c in cmds:
            print(shlex.join(c))
        return 0
    with tempfile.TemporaryDirectory(prefix="neox-launch-") as status:
        env = {**worker_env(), STATUS_DIR_ENV: status, JOB_START_ENV: repr(time.time())}
        codes = _run_forwarding_signals(cmds, env)
        code = next((c for c in codes if c), 0)
        return launcher_exit_code(code, status, plan.nproc) if not plan.hosts else code


def _run_forwarding_signals(cmds: list[list[str]], env: dict) -> list[int]:
    """Run the commands to their end, passing every stop signal this process gets straight to the workers
    (which registered their pids in the status folder; torchrun before they have), so a signal sent to this
    process alone stops the run too, and a second one reaches the workers even while torchrun is shutting down.
    Copies that also reach them from torchrun or the scheduler count once (neox.train.preempt)."""
    procs: list[subprocess.Popen] = []
    first: list[float] = []  # when the first stop signal came

    def forward(signum, frame):
        now = time.monotonic()
        if first and now - first[0] >= REPEAT_WINDOW_S:
            # a second signal ends the workers at once: torchrun must be shutting down first, not restarting them
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        first[:] = first or [now]
        pids = worker_pids(env[STATUS_DIR_ENV])
        for pid in pids or [p.pid for p in procs if p.poll() is None]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        procs.extend(subprocess.Popen(c, env=env) for c in cmds)
        return [p.wait() for p in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def resume_dir(load: str | None, save: str | None) -> str | None:
    """Where to resume from: checkpoint.load if set; else the run's own save directory when it holds a complete
    checkpoint and either torchrun restarted the workers (so `--max-restarts` continues from the last save) or
    that checkpoint is the one a stop signal or max_runtime saved (so the same command resumes the run)."""
    if load:
        return load
    if save and (restart_count() > 0 or resumable_after_stop(save)) and (Path(save) / "latest").is_file():
        return save
    return None
