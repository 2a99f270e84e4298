"""lm-evaluation-harness adapter: the harness's `LM` interface on a neox model, with no transformers in between.

Scoring follows the harness's own hf backend (same truncation, same rolling windows, right padding for scoring,
left padding for generation), so a model exported to HF scores the same numbers through either backend.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neox.data.eval_sets import eval_set_for
from neox.errors import NeoxError
from neox.infer.generate import generate, select_hidden, unwrap
from neox.infer.sampling import SamplingParams
from neox.infer.tensor_parallel import full_logits, on_local
from neox.interop.eval_tasks import data_files, local_task_dirs, local_task_names
from neox.kernels.bf16_cpu import fast_bf16_linears

# Exceptions (matched by class name, as datasets, huggingface_hub and requests name them across versions) that
# mean a task's data could not be fetched: no network, HF_*_OFFLINE set, or no such dataset on the Hub.
FETCH_ERRORS = {
    "ConnectionError",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "DatasetNotFoundError",
    "RequestException",
    "HfHubHTTPError",
    "URLError",
    "TimeoutError",
}


def _lm_base():
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError as e:  # pragma: no cover - depends on the install
        raise NeoxError("lm-evaluation-harness is not installed: pip install 'neox[eval]'") from e
    return TemplateLM


class _NeoxLM:
    """Wraps a neox GPT (forward(tokens) -> logits) and a neox tokenizer for the harness.

    The harness's base class (TemplateLM) comes from lm-eval, an optional extra: `NeoxLM` is this class
    combined with it, built on first use, so that importing this module (as `neox train` does) needs no lm-eval.
    """

    backend = "causal"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256):
        super().__init__()
        self.model = unwrap(model).eval()
        # bf16 on a CPU without bf16 units: multi-row matmuls through neox.kernels.bf16_cpu
        self._matmuls = fast_bf16_linears(self.model) or contextlib.nullcontext()
        self.tok = tokenizer
        self.batch_size = int(batch_size)
        cfg = getattr(model, "cfg", None)
        default_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None) or 2048
        self.max_length = int(max_length or default_len)
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device

    # -- what TemplateLM needs -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(list(tokens))

    # -- scoring ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request is ((context, continuation) | None, context ids, continuation ids)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            rows, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                # the harness hf backend's truncation: keep the last max_length+1 tokens, drop the final one
                rows.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            width = max(len(r) for r in rows)
            batch = torch.zeros(len(rows), width, dtype=torch.long)
            for b, r in enumerate(rows):
                batch[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            # only the continuation positions go through the output layer: [1, sum of continuation lengths, V]
            row_ids = torch.cat([torch.full((len(c),), b) for b, c in enumerate(conts)])
            col_ids = torch.cat([torch.arange(len(r) - len(c), len(r)) for r, c in zip(rows, conts)])
            with (
                select_hidden(
                    self.model,
                    lambda h, r=row_ids, c=col_ids: on_local(h, lambda x: x[r.to(x.device), c.to(x.device)][None]),
                ) as cut,
                self._matmuls,
            ):
                logits = full_logits(self.model(batch.to(self._device)))  # tensor parallel: vocab gathered
            logits = logits[0] if cut else logits[row_ids.to(logits.device), col_ids.to(logits.device)]
            logprobs = F.log_softmax(logits.float(), dim=-1)
            target = torch.tensor([t for c in conts for t in c], dtype=torch.long, device=logprobs.device)
            token_lp = logprobs.gather(-1, target[:, None])[:, 0]
            hits = logprobs.argmax(dim=-1) == target
            pos = 0
            for b, i in enumerate(idx):
                end = pos + len(conts[b])
                answer = (float(token_lp[pos:end].sum()), bool(hits[pos:end].all()))
                pos = end
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for ctx, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, ctx, pred))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, scores):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tok_decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise NeoxError(f"max_gen_toks={max_gen} must be below the model's max_length={self.max_length}")
            params = SamplingParams(
                temperature=float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0,
                top_p=float(kwargs.get("top_p") or 0.0),
                top_k=int(kwargs.get("top_k") or 0),
            )
            enc = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen) :] for i in members}
            members = sorted(members, key=lambda i: -len(enc[i]))
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                result = generate(
                    self.model,
                    [enc[i] for i in idx],
                    max_new_tokens=max_gen,
                    params=params,
                    eod_id=self.eot_token_id,
                    stop_strings=until,
                    decode=self.tok_decode,
                )
                for i, toks in zip(idx, result.tokens):
                    text = postprocess_generated_text(
                        generation=self.tok_decode(toks), stop=until, think_end_token=None
                    )
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


# -- running tasks -------------------------------------------------------------------------------------------


@functools.cache
def _neox_lm_class() -> type:
    return type("NeoxLM", (_NeoxLM, _lm_base()), {"__module__": __name__, "__doc__": _NeoxLM.__doc__})


def __getattr__(name: str):
    if name == "NeoxLM":
        return _neox_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...] = ()):
    """The harness's task index (building it reads every bundled YAML: seconds), cached per include path set
    so evaluation during training pays for it once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None)


def run_tasks(
    lm,
    tasks: list[str],
    limit: float | None = None,
    include_path: str | list[str] | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
    log_samples: bool = False,
    bootstrap_iters: int | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """simple_evaluate on an LM object; returns the harness's result dict (JSON-safe).

    Registry tasks load their data as the harness does (from the HF Hub, or its cache); local tasks read
    `data_dir` (see eval_tasks). bootstrap_iters None keeps the harness's default (stderr filled in).
    """
    from lm_eval import simple_evaluate

    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    manager = task_manager(tuple(paths + local_task_dirs(tasks, data_dir)))
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise NeoxError(f"unknown lm-eval task(s) {missing}: check the names (lm_eval ls tasks) or --include-path")
    extra = {} if bootstrap_iters is None else {"bootstrap_iters": bootstrap_iters}
    try:
        res = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            **extra,
        )
    except Exception as e:
        cause = fetch_failure(e)
        if cause is None:
            raise
        raise NeoxError(fetch_failure_message(tasks, cause)) from None
    return json.loads(json.dumps(res, default=str))


def fetch_failure(error: BaseException) -> BaseException | None:
    """The outermost exception in `error`'s chain that says data could not be fetched, or None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, FileNotFoundError) or any(c.__name__ in FETCH_ERRORS for c in type(seen).__mro__):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def fetch_failure_message(tasks: list[str], cause: BaseException) -> str:
    """One line: which tasks, why (the error's first line), and the local way round it."""
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    local = [f"{t}_local" for t in tasks if f"{t}_local" in local_task_names()]
    prepare = sorted({eval_set_for(p) for t in local for p in data_files(t)})
    offline = f"use {', '.join(local)} (data: `neox prepare {' / '.join(prepare)}`) or " if local else ""
    return (
        f"--tasks {','.join(tasks)}: the harness could not fetch the task data ({reason}); "
        f"{offline}pass --include-path DIR with task YAMLs that read local data files"
    )


# entries of a task's results that are not metrics: its display name and how many examples it scored
NOT_METRICS = {"alias", "sample_len"}


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """{"task/metric": value} for every finite numeric metric (the ",none" filter suffix dropped)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if (
                "_stderr" in name
                or name in NOT_METRICS
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            if math.isfinite(value):
                flat[f"{task}/{name.split(',')[0]}"] = float(value)
    return flat


def evaluate_model(
    model,
    tokenizer,
    tasks: list[str],
    limit: float | None = None,
    include_path: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 1234,
) -> dict[str, float]:
    """What the trainer calls every eval_tasks_interval: scores as {"task/metric": value} (no stderr, so no
    bootstrap).

    The model is put in eval mode for the run and given back in the mode it came in.
    """
    was_training = model.training
    try:
        lm = _neox_lm_class()(model, tokenizer, batch_size=batch_size, max_length=max_length)
        results = run_tasks(lm, tasks, limit=limit, include_path=include_path, seed=seed, bootstrap_iters=0)
        return flat_scores(results)
    finally:
        model.train(was_training)


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table: task, metric, value, stderr."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in sorted(results.get("results", {}).items()):
        for name, value in metrics.items():
            if "_stderr" in name or name in NOT_METRICS or not isinstance(value, (int, float)):
                continue
            metric, _, filt = name.partition(",")
            err = metrics.get(f"{metric}_stderr,{filt}") if filt else metrics.get(f"{metric}_stderr")
            err_s = f"{err:.4f}" if isinstance(err, (int, float)) else ""
            rows.append((task, metric, f"{value:.4f}", err_s))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    (out / "results.txt").write_text(results_table(results) + "\n")
    return path
