"""GPU readiness check: one script, independent checks, one table row each (`make gpu-check`).

    .venv/bin/python bench/gpu_check.py [--out gpu-check.json] [--only CHECK,...] [--backend auto|nccl|gloo]
    .venv/bin/python bench/gpu_check.py --cpu        # smoke mode: tiny sizes, gloo, CUDA-only checks skipped

Checks, in order (each with its own time budget; a failed one does not stop the others):
- env: torch / CUDA / cuDNN / NCCL versions, the GPUs, transformers, the neox commit.
- pytest-cuda: `pytest -m cuda` (the tests marked to run on a GPU too).
- train-fp32, train-bf16, train-fp16: a 20-step run of a small model on a learnable synthetic corpus; the loss
  must fall, and a run stopped at step 10 and resumed from its checkpoint must repeat steps 11-20.
- host-syncs: device-to-host synchronisations in one training step (bf16), counted with
  `torch.cuda.set_sync_debug_mode("warn")` over a few steps after warm-up, with the lines that cause them.
- attention: for each mask kind the model builds (causal, document/segment, ALiBi bias, T5 relative bias,
  grouped-query causal), the SDPA backend that runs by default (from the profiler's op names) and the ones
  that accept the shapes when forced one at a time with `torch.nn.attention.sdpa_kernel`.
- throughput: pythia-160m bf16 training, neox against transformers (bench/train.py): tokens/s, MFU, memory.
- generation: eager against compiled decoding (neox generate, bench/generate.py's model), tokens/s.
- ddp, zero2-offload, tp2-sp, onebit, pp2: `neox train --nproc 2`, both ranks on the one GPU. NCCL is the
  backend (`--backend auto`) unless it refuses two ranks on one device, as NCCL >= 2.5 does ("Duplicate GPU
  detected"); then the layouts run over gloo on CUDA tensors and the rows say so. With two or more GPUs each
  rank gets its own.

Each row is `| check | result | figure | seconds |` (a Markdown table, ready for docs/benchmarks.md); `--out`
writes the rows with their details as JSON. Exit status: 0 all passed (or were skipped), 1 some check
failed, 2 no CUDA device (without --cpu).

Every check that does GPU work runs in a child process of this script (`--one CHECK`), so a crash, a hang past
its budget or a stray CUDA context cannot spoil the next check, and each one's peak memory is its own.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 20
RESUME_AT = 10


@dataclass
class Sizes:
    """Model and run sizes of one mode (GPU or --cpu smoke)."""

    hidden: int
    layers: int
    heads: int
    seq: int
    micro: int
    attn_hidden: int  # the attention check's shapes (pythia-160m's on a GPU)
    attn_heads: int
    attn_seq: int
    layout_iters: int
    bench_train: list = field(default_factory=list)  # bench/train.py arguments
    gen_shape: str = "pythia-70m"
    gen_dtype: str = "bf16"
    gen_new_tokens: int = 128
    gen_compile: bool = True  # the compile takes minutes on a small CPU


GPU = Sizes(
    hidden=256,
    layers=4,
    heads=4,
    seq=512,
    micro=8,
    attn_hidden=768,
    attn_heads=12,
    attn_seq=2048,
    layout_iters=8,
    bench_train=["--models", "160m", "--precisions", "bf16", "--seq", "2048", "--micro", "4", "--steps", "3"],
)
CPU = Sizes(
    hidden=32,
    layers=2,
    heads=2,
    seq=32,
    micro=2,
    attn_hidden=32,
    attn_heads=2,
    attn_seq=64,
    layout_iters=4,
    bench_train=[
        *("--models", "14m", "--precisions", "fp32", "--engines", "neox", "--seq", "32", "--micro", "1"),
        *("--steps", "1", "--warmup", "0", "--threads", "1"),
    ],
    gen_shape="pythia-14m",
    gen_dtype="fp32",
    gen_new_tokens=8,
    gen_compile=False,
)


@dataclass
class Row:
    check: str
    result: str  # "pass", "fail" or "skipped: <reason>"
    figure: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


class CheckFailed(Exception):
    """A check ran but its result is wrong; the message is the row's figure."""


# ---------------------------------------------------------------------------------------------- child work
# Each function runs inside `--one NAME` and returns (figure, details); raising CheckFailed fails the row.


def device_and_sizes(cpu: bool):
    import torch

    return (torch.device("cpu"), CPU) if cpu else (torch.device("cuda", 0), GPU)


def work_env(args) -> tuple[str, dict]:
    import platform

    import torch

    d = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "neox_commit": git_commit(),
    }
    try:
        import transformers

        d["transformers"] = transformers.__version__
    except ImportError:
        d["transformers"] = None
    if args.cpu:
        return f"cpu only, torch {torch.__version__}, {os.cpu_count()} CPUs", d
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    d["gpus"] = [
        {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        for p in props
    ]
    d["cudnn"] = torch.backends.cudnn.version()
    d["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
    d["driver"] = nvidia_smi("driver_version")
    first = d["gpus"][0]
    return (
        f"{len(props)} x {first['name']} ({first['memory_gib']} GiB, sm {first['capability']}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {d['nccl']}",
        d,
    )


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def synthetic_corpus(directory: Path, docs: int = 600, seed: int = 0) -> str:
    """Byte-valued documents that step through the alphabet by a per-document stride: random enough to need
    training, regular enough that the loss falls fast. Returns the data prefix."""
    import numpy as np

    from neox.data.indexed import IndexedDatasetBuilder

    prefix = str(directory / "synthetic_text_document")
    if Path(prefix + ".idx").exists():
        return prefix
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
    for _ in range(docs):
        start, stride, n = rng.integers(0, 256), rng.integers(1, 8), rng.integers(200, 1200)
        builder.add_document(np.append((start + stride * np.arange(n)) % 256, 256))  # 256: ByteLevel's EOD
    builder.finalize()
    return prefix


def run_config(sizes: Sizes, data: str, device: str, **groups) -> dict:
    """A nested config dict for a small run on `data` (ByteLevel tokenizer); `groups` update its groups."""
    d = {
        "model": {
            "num_layers": sizes.layers,
            "hidden_size": sizes.hidden,
            "num_attention_heads": sizes.heads,
            "seq_length": sizes.seq,
            "make_vocab_size_divisible_by": 128,
        },
        "tokenizer": {"tokenizer_type": "ByteLevelTokenizer"},
        "data": {"data_path": data, "split": "98,1,1"},
        "train": {"train_iters": TRAIN_STEPS, "train_micro_batch_size_per_gpu": sizes.micro, "seed": 1234},
        "optimizer": {"type": "adamw", "lr": 2e-3, "weight_decay": 0.01},
        "schedule": {"lr_decay_style": "cosine", "warmup_iters": 2},
        "eval": {"eval_interval": 0, "eval_iters": 1},
        "logging": {"log_interval": 5, "progress_bar": False},
        "checkpoint": {"save": None},
    }
    d["train"]["device"] = device
    for group, values in groups.items():
        d.setdefault(group, {}).update(values)
    return d


def work_train(args, precision: str) -> tuple[str, dict]:
    """20 steps in `precision`; then the same run stopped at step 10 and resumed must give steps 11-20 again."""
    from neox.config import from_dict
    from neox.train.trainer import Trainer

    device, sizes = device_and_sizes(args.cpu)
    work = Path(args.workdir)
    data = synthetic_corpus(work / "data")
    run = work / f"train-{precision}"
    base = run_config(sizes, data, str(device), precision={"precision": precision})

    def trainer(**checkpoint):
        return Trainer(from_dict({**base, "checkpoint": checkpoint}, source=f"<gpu-check {precision}>"), quiet=True)

    t0 = time.perf_counter()
    full = trainer(save=None)
    full.fit()
    seconds = time.perf_counter() - t0
    first = trainer(save=str(run), overwrite=True)
    first.fit(stop_at=RESUME_AT)
    resumed = trainer(save=str(run), load=str(run))
    resumed.fit()
    losses, again = full.losses, resumed.losses
    details = {"losses": losses, "resumed_losses": again, "skipped_steps": full.skipped_steps}
    if len(losses) != TRAIN_STEPS or len(again) != TRAIN_STEPS - RESUME_AT:
        raise CheckFailed(f"ran {len(losses)} steps and {len(again)} resumed ones")
    if not all(map(is_finite, losses)):
        raise CheckFailed(f"non-finite loss: {losses}")
    drift = max(abs(a - b) for a, b in zip(losses[RESUME_AT:], again))
    details["resume_max_abs_diff"] = drift
    # bitwise equality is not promised on a GPU (atomics in the embedding backward, split-K matmuls)
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    figure = (
        f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, resume max diff {drift:.1e}, "
        f"{TRAIN_STEPS * sizes.micro * sizes.seq / seconds:.0f} tok/s"
    )
    if losses[-1] >= losses[0]:
        raise CheckFailed("loss did not fall: " + figure)
    if drift > tolerance:
        raise CheckFailed(f"resumed run differs by {drift:.2e} > {tolerance}: " + figure)
    return figure, details


def is_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


SYNC_MESSAGE = "called a synchronizing CUDA operation"


def work_host_syncs(args) -> tuple[str, dict]:
    """Host syncs per bf16 training step: Python-side ones with the line that asked, C++-thread ones (the
    autograd engine's) by their count in stderr."""
    import collections
    import warnings

    import torch

    from neox.config import from_dict
    from neox.train.trainer import Trainer

    device, sizes = device_and_sizes(args.cpu)
    data = synthetic_corpus(Path(args.workdir) / "data")
    cfg = from_dict(run_config(sizes, data, str(device), precision={"precision": "bf16"}), source="<gpu-check>")
    trainer = Trainer(cfg, quiet=True)
    loader = trainer._loader(trainer.train_data, 0)
    warmup, steps = 2, 5
    for _ in range(warmup):
        trainer.train_step(trainer._next_step_batches(loader))
    torch.cuda.synchronize()
    where: collections.Counter = collections.Counter()
    with tempfile.TemporaryFile(mode="w+") as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(steps):
                    batch = trainer._next_step_batches(loader)  # the loader's copies are not the step's
                    torch.cuda.set_sync_debug_mode("warn")
                    trainer.train_step(batch)
                    torch.cuda.set_sync_debug_mode(0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        from_threads = err.read().count(SYNC_MESSAGE)
    for w in caught:
        if SYNC_MESSAGE in str(w.message):
            where[f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}"] += 1
    total = sum(where.values()) + from_threads
    details = {"steps": steps, "per_line": dict(where.most_common()), "from_other_threads": from_threads}
    top = ", ".join(f"{k} x{v / steps:g}" for k, v in where.most_common(3))
    return f"{total / steps:g} per step" + (f" ({top})" if top else ""), details


SDPA_OPS = {  # profiler op name -> backend
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


ATTENTION_KINDS = {  # mask kind -> (model keys, whether the batch has segment (document) ids)
    "causal": ({"pos_emb": "rotary"}, False),
    "document": ({"pos_emb": "rotary"}, True),
    "alibi": ({"pos_emb": "alibi"}, False),
    "t5-bias": ({"pos_emb": "rpe"}, False),
    "gqa-causal": ({"pos_emb": "rotary", "num_kv_heads": "heads/4"}, False),
}


def work_attention(args) -> tuple[str, dict]:
    """Which SDPA backend each mask kind gets, forward and backward, at the model's own shapes."""
    import torch

    from neox.config import from_dict
    from neox.model import GPT

    device, sizes = device_and_sizes(args.cpu)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    h, heads, t = sizes.attn_hidden, sizes.attn_heads, sizes.attn_seq
    report, details = [], {}
    for kind, (keys, segmented) in ATTENTION_KINDS.items():
        keys = {k: max(1, heads // 4) if v == "heads/4" else v for k, v in keys.items()}
        m = {"num_layers": 1, "hidden_size": h, "num_attention_heads": heads, "seq_length": t, "vocab_size": 128}
        model = GPT(from_dict({"model": {**m, **keys}}).model).to(device)
        tokens = torch.randint(0, 128, (2, t), device=device)
        segments = (torch.arange(t, device=device) >= t // 3).long().expand(2, t) if segmented else None
        details[kind] = sdpa_backends(functools.partial(model, tokens, segment_ids=segments), device, dtype)
        report.append(f"{kind} {'+'.join(details[kind]['default'])}")
    return "; ".join(report), details


def sdpa_backends(forward, device, dtype) -> dict:
    """The SDPA backend(s) `forward` (and its backward) runs by default, from the profiler's op names, and the
    backends that accept it when forced one at a time (with the reason of each that does not)."""
    import warnings

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = forward()
        logits.float().mean().backward()

    forced = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    accepted, refused = [], {}
    for name, backend in forced.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    step()
                accepted.append(name)
            except RuntimeError as e:
                reasons = [str(w.message).splitlines()[0] for w in caught] or [str(e).splitlines()[0]]
                refused[name] = reasons[0][:160]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ran = sorted({SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS}) or ["?"]
    return {"default": ran, "accepted": accepted, "refused": refused}


def work_generation(args) -> tuple[str, dict]:
    """Eager and compiled greedy decoding of bench/generate.py's model on the device, same prompts."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import generate as bench_generate  # bench/generate.py

    device, sizes = device_and_sizes(args.cpu)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sizes.gen_dtype]
    ours, _ = bench_generate.build_pair(sizes.gen_shape, dtype)
    ours = ours.to(device)
    prompts = torch.randint(0, 50000, (1, 32), generator=torch.Generator().manual_seed(1)).tolist()
    n = sizes.gen_new_tokens
    bench_generate.time_neox(ours, prompts, 4)  # warm-up
    eager_s, eager = bench_generate.time_neox(ours, prompts, n)
    head = f"{sizes.gen_shape} {sizes.gen_dtype} batch 1: eager {n / eager_s:.0f} tok/s"
    details = {"eager_tok_s": n / eager_s}
    if not sizes.gen_compile:
        return head + ", compiled skipped on CPU", details
    compile_s, _ = bench_generate.time_neox(ours, prompts, n, compile=True)  # the first call compiles
    compiled_s, compiled = bench_generate.time_neox(ours, prompts, n, compile=True)
    same = eager == compiled
    details.update(compiled_tok_s=n / compiled_s, compile_s=compile_s, same_tokens=same)
    figure = f"{head}, compiled {n / compiled_s:.0f} tok/s ({eager_s / compiled_s:.2f}x), compile {compile_s:.0f} s"
    if not same and sizes.gen_dtype == "fp32":
        raise CheckFailed("compiled tokens differ from eager: " + figure)
    return figure + ("" if same else ", tokens differ (bf16 near-ties)"), details


WORK = {
    "env": work_env,
    "train-fp32": lambda a: work_train(a, "fp32"),
    "train-bf16": lambda a: work_train(a, "bf16"),
    "train-fp16": lambda a: work_train(a, "fp16"),
    "host-syncs": work_host_syncs,
    "attention": work_attention,
    "generation": work_generation,
}


def run_one(args) -> int:
    """`--one NAME`: do one check's work here and write its (figure, details) or error to --result."""
    import traceback

    try:
        figure, details = WORK[args.one](args)
        out = {"result": "pass", "figure": figure, "details": details}
    except CheckFailed as e:
        out = {"result": "fail", "figure": str(e), "details": {}}
    except Exception as e:
        out = {"result": "fail", "figure": f"{type(e).__name__}: {e}".splitlines()[0][:300], "details": {}}
        traceback.print_exc()
    Path(args.result).write_text(json.dumps(out, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- the parent


class Runner:
    """Runs the checks in order, prints a row as each ends, keeps them for the JSON report."""

    def __init__(self, args):
        self.args = args
        self.rows: list[Row] = []
        self.work = Path(args.workdir)
        self.nccl_refused = False

    def child(self, name: str, budget: float) -> Row:
        """Run WORK[name] in a fresh process of this script, within `budget` seconds."""
        result = self.work / f"{name}.result.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--one", name, "--result", str(result), "--workdir", str(self.work)]
        if self.args.cpu:
            cmd.append("--cpu")
        proc = self.subprocess(cmd, budget)
        if proc is None:
            return Row(name, "fail", f"over its {budget:.0f} s budget")
        if not result.exists():
            return Row(name, "fail", f"exit {proc.returncode}: {last_line(proc.stdout)}")
        r = json.loads(result.read_text())
        if r["result"] == "fail":
            r["details"]["log_tail"] = proc.stdout[-3000:]
        return Row(name, r["result"], r["figure"], details=r["details"])

    def subprocess(self, cmd: list[str], budget: float, env: dict | None = None):
        """The finished process (stdout and stderr together), or None when it ran past `budget`."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            return subprocess.run(
                cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=budget
            )
        except subprocess.TimeoutExpired:
            return None

    def pytest_cuda(self, budget: float) -> Row:
        if self.args.cpu:
            return Row("pytest-cuda", "skipped: no CUDA")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
        proc = self.subprocess(cmd, budget)
        if proc is None:
            return Row("pytest-cuda", "fail", f"over its {budget:.0f} s budget")
        summary = last_line(proc.stdout)
        ok = proc.returncode == 0
        if proc.returncode == 5:
            summary = "no test is marked cuda"
        return Row("pytest-cuda", "pass" if ok else "fail", summary, details={"log_tail": proc.stdout[-3000:]})

    def throughput(self, budget: float) -> Row:
        sizes = CPU if self.args.cpu else GPU
        out = self.work / "bench-train.json"
        proc = self.subprocess(
            [sys.executable, str(ROOT / "bench" / "train.py"), *sizes.bench_train, "--json", str(out)], budget
        )
        if proc is None:
            return Row("throughput", "fail", f"over its {budget:.0f} s budget")
        results = json.loads(out.read_text()) if out.exists() else []
        failed = [line.strip() for line in proc.stdout.splitlines() if "failed:" in line]
        if proc.returncode != 0 or not results or failed:
            return Row("throughput", "fail", (failed or [last_line(proc.stdout)])[0], details={"log": proc.stdout})
        parts = [
            f"{r['engine']} {r['precision']} {r['tokens_per_s']:.0f} tok/s {100 * r['mfu']:.1f}% "
            f"{r['peak_mem_bytes'] / 2**30:.1f} GiB"
            for r in results
        ]
        return Row("throughput", "pass", f"{results[0]['shape']}: " + "; ".join(parts), details={"cases": results})

    def layout(self, name: str, groups: dict, budget: float) -> Row:
        """`neox train --nproc 2` of a small model in one parallel layout, both ranks on one GPU (or CPU)."""
        sizes = CPU if self.args.cpu else GPU
        data = self.shared_data()
        backend = self.layout_backend()
        cfg = run_config(
            sizes,
            data,
            "cpu" if self.args.cpu else "cuda",
            parallel={"backend": backend, **groups.get("parallel", {})},
            train={"train_iters": sizes.layout_iters, **groups.get("train", {})},
            precision={"precision": "fp32" if self.args.cpu else "bf16"},
        )
        row = self.neox_train(name, cfg, budget)
        if (
            row.result == "fail"
            and backend == "nccl"
            and self.args.backend == "auto"
            and "Duplicate GPU" in row.details.get("log_tail", "")
        ):
            self.nccl_refused = True  # every later layout goes straight to gloo
            cfg["parallel"]["backend"] = "gloo"
            row = self.neox_train(name, cfg, budget)
        if self.nccl_refused and not self.args.cpu:
            row.figure = "gloo (NCCL refuses 2 ranks on 1 GPU): " + row.figure
        return row

    def layout_backend(self) -> str:
        if self.args.cpu:
            return "gloo"
        if self.args.backend != "auto":
            return self.args.backend
        return "gloo" if self.nccl_refused else "nccl"

    def neox_train(self, name: str, cfg: dict, budget: float) -> Row:
        config = self.work / f"{name}.yml"
        config.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        cmd = [
            sys.executable,
            "-m",
            "neox.cli",
            "train",
            str(config),
            "--nproc",
            "2",
            "--master-port",
            str(free_port()),
        ]
        proc = self.subprocess(cmd, budget, env={"OMP_NUM_THREADS": "1"})
        if proc is None:
            return Row(name, "fail", f"over its {budget:.0f} s budget")
        done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
        if proc.returncode != 0 or not done:
            return Row(
                name,
                "fail",
                f"exit {proc.returncode}: {error_line(proc.stdout)}",
                details={"log_tail": proc.stdout[-4000:]},
            )
        figure = done[-1].removeprefix("done: ").split(" | ")[:2]  # "iteration N", "loss X"
        figure = ", ".join(figure)
        if re.search(r"\b(nan|inf)\b", figure):
            return Row(name, "fail", figure)
        return Row(name, "pass", f"backend {cfg['parallel']['backend']}, {figure}")

    def shared_data(self) -> str:
        return synthetic_corpus(self.work / "data")

    def run(self, name: str, budget: float, fn) -> None:
        if self.args.only and name not in self.args.only:
            return
        t0 = time.perf_counter()
        row = fn(budget)
        row.check, row.seconds = name, round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        row.figure = row.figure.replace("|", "/")  # a Markdown table cell
        print(f"| {row.check} | {row.result} | {row.figure} | {row.seconds:.0f} |", flush=True)


LAYOUTS = {  # name -> config groups on top of run_config
    "ddp": {},
    "zero2-offload": {"parallel": {"zero_stage": 2, "cpu_offload": True}},
    "tp2-sp": {"parallel": {"model_parallel_size": 2, "sequence_parallel": True}},
    "onebit": {"parallel": {"grad_compression": "onebit", "grad_compression_start_iter": 2}},
    "pp2": {"parallel": {"pipe_parallel_size": 2}, "train": {"gradient_accumulation_steps": 2}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def error_line(text: str) -> str:
    """The most telling line of a failed run's output: a rank's exception, neox's one-line error, else the
    last line naming an error."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for pattern in (r"^\[rank\d+\]: \w+(Error|Exception)\b", r"error:", r"(Error|Exception)\b"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[0 if pattern.startswith("^") else -1][:300]
    return last_line(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cpu", action="store_true", help="smoke mode without a GPU: tiny sizes, gloo, CUDA-only checks skipped"
    )
    p.add_argument("--out", default=None, help="write the rows and their details here as JSON")
    p.add_argument("--only", default=None, help="comma-separated checks to run (default: all)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "nccl", "gloo"),
        help="backend of the two-rank checks (auto: nccl, falling back to gloo when NCCL refuses two ranks on one GPU)",
    )
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); --cpu runs the smoke mode")
        return 2
    args.only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="neox-gpu-check-") as tmp:
        args.workdir = args.workdir or tmp
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        r = Runner(args)
        print(
            f"gpu check ({'cpu smoke mode' if args.cpu else 'cuda'}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        print("| check | result | figure | seconds |\n|---|---|---|---|", flush=True)
        r.run("env", 60, lambda b: r.child("env", b))
        r.run("pytest-cuda", 180, r.pytest_cuda)
        for prec in ("fp32", "bf16", "fp16"):
            r.run(f"train-{prec}", 120, lambda b, prec=prec: r.child(f"train-{prec}", b))
        cuda_only = (lambda name: lambda b: Row(name, "skipped: no CUDA")) if args.cpu else None
        r.run("host-syncs", 90, cuda_only("host-syncs") if args.cpu else lambda b: r.child("host-syncs", b))
        r.run("attention", 90, lambda b: r.child("attention", b))
        r.run("throughput", 300, r.throughput)
        r.run("generation", 240, lambda b: r.child("generation", b))
        for name, groups in LAYOUTS.items():
            r.run(name, 180, lambda b, name=name, groups=groups: r.layout(name, groups, b))
        total = sum(row.seconds for row in r.rows)
        failed = [row.check for row in r.rows if row.result == "fail"]
        print(
            f"{len(r.rows)} checks in {total:.0f} s: "
            + (f"failed: {', '.join(failed)}" if failed else "all passed or skipped")
        )
        if args.out:
            report = {"mode": "cpu" if args.cpu else "cuda", "seconds": total, "rows": [asdict(row) for row in r.rows]}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
