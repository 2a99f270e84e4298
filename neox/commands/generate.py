"""`neox generate CHECKPOINT`: unconditional samples, a prompt, an input file -> JSONL, or an interactive prompt.

With `--nproc N` the command re-launches itself under torchrun and the model runs tensor parallel over the N
processes (neox.infer.tensor_parallel); only rank 0 prints or writes.

Settings come from the checkpoint's `generation` config group, then --config files and --set overrides, then
the flags below (a flag that is given wins). CHECKPOINT may also be a local transformers GPTNeoX / Llama model
directory: it is converted in memory (neox.interop.hf), with the `generation` defaults.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from neox.commands.common import add_overrides, check_positive
from neox.data.readers import is_jsonl, json_line_error
from neox.errors import NeoxError, ensure_dir
from neox.infer.api import LoadedModel, build_model_for, build_tokenizer_for, checkpoint_config
from neox.infer.generate import generate
from neox.infer.sampling import SamplingParams
from neox.infer.tensor_parallel import (
    check_inference_layout,
    init_inference,
    is_output_rank,
    shard_model,
    shared_seed,
    world_size,
)
from neox.interop.hf import hf_config, is_hf_model_dir, load_hf_model
from neox.kernels.device import resolve_device
from neox.parallel import launch
from neox.train.checkpoint import resolve

# flag dest -> generation config key
FLAG_KEYS = {
    "max_new_tokens": "maximum_tokens",
    "num_samples": "num_samples",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "stop": "stop_strings",
    "recompute": "recompute",
    "compile": "compile_decode",
    "input_file": "sample_input_file",
    "output_file": "sample_output_file",
}


def register(parser, name):
    parser.add_argument(
        "checkpoint",
        help="run directory (its latest checkpoint), one checkpoint directory, or a Hugging Face model directory "
        "(GPTNeoXForCausalLM / LlamaForCausalLM with config.json: converted in memory, nothing is written)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="extra config file(s) applied over the checkpoint's config (generation keys)",
    )
    add_overrides(parser, "e.g. --set generation.top_k=40 (repeatable)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="continue this text (num-samples completions)")
    mode.add_argument("--input-file", help="prompts, one per line or JSONL with a 'prompt' (or 'text') key")
    mode.add_argument("--interactive", action="store_true", help="read prompts from stdin, stream the output")
    parser.add_argument("--output-file", help="write JSONL (prompt, completion, timing) here")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--num-samples", type=int, help="samples per prompt (unconditional / --prompt)")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--no-stop-at-eod", action="store_true", help="keep generating past end-of-document")
    parser.add_argument(
        "--recompute",
        action="store_true",
        default=None,
        help="no KV cache: rerun the whole sequence every step (for comparison)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="decode with a compiled step (faster per token; the first batch compiles for a while)",
    )
    parser.add_argument("--seed", type=int, help="sampling seed (default: random)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward in input-file mode")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights/activations dtype")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    launch.add_arguments(parser)  # --nproc N: the model tensor parallel over N processes
    parser.set_defaults(func=run)


def _generation_config(cfg, args):
    changes = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None}
    if args.prompt is not None or args.interactive:
        changes["text_gen_type"] = "interactive" if args.interactive else "unconditional"
    elif args.input_file is not None:
        changes["text_gen_type"] = "input-file"
    return dataclasses.replace(cfg.generation, **changes)


def read_prompts(path: str) -> list[str]:
    """Plain text (one prompt per line; `\\n` escapes allowed) or JSONL objects with a prompt/text key. In a
    .jsonl (.json, .ndjson) file every line must be such an object; elsewhere a line starting with `{` is one."""
    p = Path(path)
    if not p.is_file():
        raise NeoxError(f"--input-file {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NeoxError(
            f"--input-file {p}: not UTF-8 text (byte {e.start}); prompt files are read uncompressed"
        ) from None
    jsonl = is_jsonl(str(p))
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl or line.lstrip().startswith("{"):
            prompts.append(_json_prompt(p, n, line))
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise NeoxError(f"--input-file {p}: no prompts in the file")
    return prompts


def _json_prompt(p: Path, n: int, line: str) -> str:
    if not line.lstrip().startswith("{"):
        raise NeoxError(
            f"{p}:{n}: not a JSON object; every line of a {p.suffix} prompt file is one, e.g. "
            '{"prompt": "..."} (plain prompts go in a .txt file, one per line)'
        )
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise NeoxError(f"{p}:{n}: {json_line_error(e)}") from None
    text = obj.get("prompt", obj.get("text"))  # a line starting with `{` that parses is an object
    if not isinstance(text, str):
        raise NeoxError(f"{p}:{n}: JSON line needs a string 'prompt' (or 'text') field")
    return text


class Session:
    """The loaded model plus the run's settings; each method is one mode."""

    def __init__(self, model, tokenizer, gen, args):
        self.model, self.tok, self.gen, self.args = model, tokenizer, gen, args
        self.params = SamplingParams(gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty)
        self.generator = torch.Generator(device=next(model.parameters()).device)
        seed = shared_seed(args.seed)  # under tensor parallelism every rank samples with rank 0's seed
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def run_batch(self, prompts: list[str], on_tokens=None):
        ids = [self.model.encode_prompt(p) for p in prompts]
        t0 = time.perf_counter()
        res = generate(
            self.model.module,
            ids,
            max_new_tokens=self.gen.maximum_tokens,
            params=self.params,
            eod_id=None if self.args.no_stop_at_eod else self.tok.eod_id,
            stop_strings=self.gen.stop_strings,
            decode=self.tok.decode,
            generator=self.generator,
            recompute=self.gen.recompute,
            on_tokens=on_tokens,
            compile=self.gen.compile_decode,
        )
        # compilation (the first batch of a shape under --compile) is reported apart from the throughput
        return res, time.perf_counter() - t0 - res.compile_s

    def records(self, prompts: list[str], res, seconds: float) -> list[dict]:
        return [
            {
                "prompt": p,
                "completion": text,
                "tokens": len(toks),
                "token_ids": toks,
                "finish_reason": reason,
                "time_s": round(seconds, 4),
                "batch_size": len(prompts),
                "tokens_per_s": round(res.new_tokens / seconds, 2) if seconds > 0 else None,
                "compile_s": round(res.compile_s, 2),
            }
            for p, text, toks, reason in zip(prompts, res.texts, res.tokens, res.finish_reasons)
        ]

    def samples(self, prompt: str) -> list[dict]:
        out = []
        n = max(1, self.gen.num_samples)
        for start in range(0, n, self.args.batch_size):
            prompts = [prompt] * min(self.args.batch_size, n - start)
            res, seconds = self.run_batch(prompts)
            out += self.records(prompts, res, seconds)
        return out

    def input_file(self, path: str) -> list[dict]:
        prompts = read_prompts(path)
        out = []
        for start in range(0, len(prompts), self.args.batch_size):
            chunk = prompts[start : start + self.args.batch_size]
            res, seconds = self.run_batch(chunk)
            out += self.records(chunk, res, seconds)
        return out

    def interactive(self, stdin=None, stdout=None) -> list[dict]:
        stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
        tty = stdin.isatty()
        out = []
        while True:
            if tty:
                stdout.write("prompt> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            prompt = line.rstrip("\n").replace("\\n", "\n")
            stream = _Streamer(self.tok, stdout)
            res, seconds = self.run_batch([prompt], on_tokens=stream)
            stream.finish(res.texts[0])
            out += self.records([prompt], res, seconds)
        return out


class _Streamer:
    """Prints row 0's text as tokens arrive; holds back a trailing partial UTF-8 character."""

    def __init__(self, tokenizer, stdout):
        self.tok, self.stdout, self.ids, self.shown = tokenizer, stdout, [], ""

    def __call__(self, tokens, active):
        if not bool(active[0]):
            return
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._show(text)

    def _show(self, text: str):
        if text.startswith(self.shown):
            self.stdout.write(text[len(self.shown) :])
            self.stdout.flush()
            self.shown = text

    def finish(self, final: str):
        # stop strings / EOD are cut from the final text; what was already printed stays, the rest follows
        self._show(final)
        self.stdout.write("\n")
        self.stdout.flush()


def _check_parallel(cfg, gen, world: int, source: str, saved) -> None:
    check_inference_layout(cfg, world, source, saved)
    if world > 1 and gen.text_gen_type == "interactive":
        raise NeoxError("--interactive reads one terminal and cannot run over several processes; drop --nproc")
    if world > 1 and gen.compile_decode:
        raise NeoxError("--compile (generation.compile_decode) is not supported with --nproc > 1 yet; drop one")


def run(args) -> int:
    # the flags skip the config loader's range checks (generation.maximum_tokens / num_samples are >= 1 there)
    check_positive(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, batch_size=args.batch_size)
    hf_dir = is_hf_model_dir(args.checkpoint)
    if hf_dir:
        ckpt, cfg, saved = None, hf_config(args.checkpoint, args.config, args.overrides), None
    else:
        ckpt = resolve(args.checkpoint)
        cfg = checkpoint_config(ckpt, args.config, args.overrides)
        saved = checkpoint_config(ckpt) if args.config or args.overrides else None
    gen = _generation_config(cfg, args)
    if gen.sample_output_file:  # checked before sampling so that no samples are lost to a bad path
        ensure_dir(Path(gen.sample_output_file).parent, "--output-file's folder")
    source = str(args.checkpoint)
    code = launch.launch(args, sys.argv[1:], validate=lambda world: _check_parallel(cfg, gen, world, source, saved))
    if code is not None:
        return code
    _check_parallel(cfg, gen, world_size(), source, saved)
    device = resolve_device(args.device)
    mesh = init_inference(cfg, device, source)
    tokenizer = build_tokenizer_for(cfg, ckpt)
    if hf_dir:
        module = load_hf_model(cfg, args.checkpoint, "cpu" if mesh is not None else device, args.dtype)
        module = shard_model(module, mesh, device) if mesh is not None else module
    else:
        module = build_model_for(cfg, ckpt, device, args.dtype, mesh)
    model = LoadedModel(module, tokenizer, cfg)
    session = Session(model, tokenizer, gen, args)

    if gen.text_gen_type == "interactive":
        records = session.interactive()
    elif gen.text_gen_type == "input-file":
        if not gen.sample_input_file:
            raise NeoxError("input-file mode needs --input-file (generation.sample_input_file)")
        records = session.input_file(gen.sample_input_file)
    else:
        records = session.samples(args.prompt or "")
    if not is_output_rank():
        return 0  # the other tensor-parallel ranks computed the same records
    if gen.text_gen_type != "interactive" and not gen.sample_output_file:
        for i, r in enumerate(records):
            compiled = f", compiled in {r['compile_s']:.1f} s" if r["compile_s"] else ""
            print(
                f"--- sample {i} ({r['tokens']} tokens, {r['finish_reason']}, {r['tokens_per_s']} tok/s{compiled}) ---"
            )
            print(r["prompt"] + r["completion"])
    if gen.sample_output_file:
        out = Path(gen.sample_output_file)
        with out.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} completions to {out}", file=sys.stderr)
    return 0
