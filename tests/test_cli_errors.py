"""Bad input to every `neox` command: exit status 2 and one stderr line `neox CMD: error: ...` naming the file,
key or flag at fault, never a traceback. Each row is one realistic mistake, run in-process through the CLI."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from neox.cli import main
from neox.data.indexed import IndexedDatasetBuilder
from tests.infer.tiny import make_run, tiny_config

TINY_MODEL = (
    "num_layers: 2\nhidden_size: 32\nnum_attention_heads: 2\nseq_length: 32\nprecision: fp32\n"
    "train_micro_batch_size_per_gpu: 2\n"
)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A working folder holding one good and several broken inputs of each kind the commands read."""
    d = tmp_path_factory.mktemp("cli_errors")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 8}) + "\n" for i in range(20)))
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "afile").write_text("a file where a directory is expected\n")
    (d / "model.yml").write_text(TINY_MODEL + f"data_path: {d}/ds/corpus_text_document\ntrain_iters: 1\n")
    (d / "malformed.yml").write_text("num_layers: [\n")
    (d / "unknown.yml").write_text("num_layerz: 2\n")
    (d / "wrongtype.yml").write_text("num_layers: two\n")
    (d / "dup.yml").write_text("num_layers: 2\nnum_layers: 3\n")
    (d / "toplist.yml").write_text("- a\n- b\n")
    (d / "bad.json").write_text('{"num_layers": 2,')
    (d / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": oops\n')
    (d / "literal.jsonl").write_text('{"prompt": "a"}\nOnce upon a time\n')  # a plain line in a .jsonl
    (d / "split.jsonl").write_text('{\n  "text": "pretty-printed"\n}\n')
    (d / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:20])

    assert (
        main(
            [
                "preprocess",
                "--input",
                str(d / "corpus.jsonl"),
                "--output-prefix",
                str(d / "ds/corpus"),
                "--append-eod",
                "--quiet",
            ]
        )
        == 0
    )
    (d / "empty.jsonl").write_text("")
    IndexedDatasetBuilder(str(d / "ds/empty_text_document"), np.uint16).finalize()  # preprocess refuses to
    good = d / "ds/corpus_text_document"
    shutil.copy(f"{good}.idx", d / "cutbin.idx")
    (d / "cutbin.bin").write_bytes(Path(f"{good}.bin").read_bytes()[:50])
    shutil.copy(f"{good}.bin", d / "cutidx.bin")
    (d / "cutidx.idx").write_bytes(Path(f"{good}.idx").read_bytes()[:20])
    for ext in (".bin", ".idx", ".checksums.json"):  # a byte flipped after preprocessing: the sidecar catches it
        shutil.copy(f"{good}{ext}", d / f"flip{ext}")
    flipped = bytearray((d / "flip.bin").read_bytes())
    flipped[10] ^= 1
    (d / "flip.bin").write_bytes(bytes(flipped))

    run = make_run(d / "run", tiny_config(hidden_size=32))
    make_run(d / "alibi", tiny_config(hidden_size=32, pos_emb="alibi"))
    ckpt = run / "iter_0000001"
    shutil.copytree(run, d / "badconfig")
    (d / "badconfig/iter_0000001/config.yml").write_text("model: [\n")
    shutil.copytree(run, d / "noshard")
    for shard in (d / "noshard/iter_0000001").glob("*.distcp"):
        shard.unlink()
    (d / "nolatest").mkdir()
    shutil.copytree(ckpt, d / "nolatest/iter_0000001")
    (d / "stale").mkdir()
    (d / "stale/latest").write_text("iter_0000009\n")
    (d / "notckpt").mkdir()
    (d / "gpt2").mkdir()
    (d / "gpt2/config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    (d / "neoxcfg").mkdir()  # a config.json alone: the refusals below come before any weights are read
    (d / "neoxcfg/config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "architectures": ["GPTNeoXForCausalLM"],
                "hidden_size": 32,
                "num_attention_heads": 2,
                "num_hidden_layers": 2,
                "intermediate_size": 128,
                "vocab_size": 384,
                "max_position_embeddings": 128,
            }
        )
    )
    (d / "notype").mkdir()
    (d / "notype/config.json").write_text("{}")
    return d


# (argv with {d} for the working folder, text the error line must contain)
CASES = [
    # preprocess
    ("preprocess --input {d}/nope.jsonl --output-prefix {d}/o/a", "nope.jsonl"),
    # the place within the line, not json's own "line 1 column 10 (char 9)" beside the file's line number
    (
        "preprocess --input {d}/bad.jsonl --output-prefix {d}/o/b --strict",
        "bad.jsonl:2: bad JSON: Expecting value at column 10 (--strict",
    ),
    (
        "preprocess --input {d}/split.jsonl --output-prefix {d}/o/s --strict",
        "split.jsonl:1: bad JSON: Expecting property name enclosed in double quotes at the end of the line (one whole",
    ),
    ("preprocess --input {d}/cut.jsonl.gz --output-prefix {d}/o/c", "cut.jsonl.gz"),
    ("preprocess --input {d}/corpus.jsonl --output-prefix {d}/o/d --tokenizer-type Bogus", "tokenizer_type"),
    (
        "preprocess --input {d}/corpus.jsonl --output-prefix {d}/o/e --tokenizer-type HFTokenizer "
        "--vocab-file {d}/nope.json",
        "nope.json",
    ),
    ("preprocess --input {d}/corpus.jsonl --output-prefix {d}/o/f --workers 0", "--workers"),
    ("preprocess --input {d}/corpus.jsonl --output-prefix {d}/afile/x", "afile"),
    ("preprocess --input {d}/empty.jsonl --output-prefix {d}/o/g", "no documents"),
    ("preprocess --input {d}/corpus.jsonl --output-prefix {d}/o/h --json-keys body", "--json-keys (body)"),
    ("preprocess --input {d}/corpus.jsonl --output-prefix {d}/o/i --preference pairs", "corpus.jsonl:1: key 'prompt'"),
    ("preprocess --input {d}/corpus.jsonl --output-prefix {d}/o/j --chat-template {d}/nope.jinja", "nope.jinja"),
    ("preprocess --input {d}/corpus.jsonl --output-prefix {d}/o/k --chat-template tokenizer", "--vocab-file"),
    # score
    ("score {d}/nope --input {d}/corpus.jsonl", "corpus.jsonl:1: key 'prompt' is missing"),
    ("score {d}/nope --input {d}/corpus.jsonl --batch-size 0", "--batch-size"),
    # tokenizer
    ("tokenizer train {d}/nope.txt --vocab-size 300 --out {d}/o/tok.json", "nope.txt"),
    ("tokenizer train {d}/corpus.jsonl --vocab-size 10 --out {d}/o/tok.json", "--vocab-size"),
    ("tokenizer train {d}/corpus.jsonl --vocab-size 300 --out {d}/afile/tok.json", "afile"),
    ("tokenizer train {d}/empty.jsonl --vocab-size 300 --out {d}/o/tok.json", "no text"),
    # data
    ("data inspect {d}/nope", "nope.idx"),
    ("data inspect {d}/cutbin", "cutbin.bin"),
    ("data inspect {d}/cutidx", "cutidx.idx"),
    ("data inspect {d}/ds/corpus_text_document --doc 999", "--doc 999"),
    ("data inspect {d}/ds/corpus_text_document --sample 1 --seq-length 0", "--seq-length"),
    ("data merge --input {d}/ds/corpus_text_document --output-prefix {d}/afile/m", "afile"),
    ("data verify {d}/cutbin", "cutbin.bin"),
    ("data verify {d}/flip", "flip.bin: the 65536-byte block at offset 0 differs"),
    # config files and --set, through info and config show
    ("info {d}/nope.yml", "nope.yml"),
    ("info {d}/malformed.yml", "malformed.yml: line 2"),
    ("info {d}/unknown.yml", "'num_layerz'"),
    ("info {d}/wrongtype.yml", "'num_layers'"),
    ("info {d}/dup.yml", "'num_layers' appears twice"),
    ("info {d}/toplist.yml", "toplist.yml"),
    ("info {d}/bad.json", "bad.json: line 1"),
    ("info {d}/model.yml --set foo", "--set foo"),
    ("info {d}/model.yml --set nokey=1", "'nokey'"),
    ("info {d}/model.yml --set model.num_layers=abc", "model.num_layers"),
    ("info {d}/model.yml --vocab-size -5", "--vocab-size"),
    ("config show {d}/malformed.yml", "malformed.yml"),
    ("config show {d}/model.yml --set attention_config=[[[local],3]]", "'attention_config': gives 3 layer types"),
    ("config show {d}/model.yml --set attention_config=[[[gmlp],all]]", "'gmlp' is not supported: gMLP"),
    ("config show {d}/model.yml --set sparsity_config.blok=8", "'sparsity_config.blok'"),
    ("config show {d}/model.yml --set pack_impl=sorted", "'pack_impl'"),
    # train
    ("train {d}/unknown.yml", "'num_layerz'"),
    ("train {d}/model.yml --set data_path={d}/nope/x", "data.data_path"),
    ("train {d}/model.yml --set data_path={d}/cutbin", "cutbin.bin"),
    ("train {d}/model.yml --set data_path={d}/flip", "flip.bin: the 65536-byte block"),
    ("train {d}/model.yml --set num_attention_heads=3", "num_attention_heads"),
    ("train {d}/model.yml --set tokenizer_type=HFTokenizer", "--set tokenizer_type=HFTokenizer"),
    ("train {d}/model.yml --set tokenizer_type=HFTokenizer --set vocab_file={d}/nope.json", "nope.json"),
    ("train {d}/model.yml --nproc 0", "--nproc"),
    ("train {d}/model.yml --set lora.rank=4 --set lora.target_modules=[qkv]", "lora.target_modules"),
    ("train {d}/model.yml --set lora.rank=4 --set lora.target_modules=[w1]", "'w1' names no linear layer"),
    ("distill {d}/model.yml --teacher {d}/nope", "nope"),
    ("distill {d}/model.yml --teacher {d}/model.yml --set train.distill_alpha=2", "train.distill_alpha"),
    ("train {d}/model.yml --hostfile {d}/nope.hosts", "nope.hosts"),
    ("train {d}/model.yml --set checkpoint.load={d}/badconfig", "config.yml"),
    ("train {d}/model.yml --set data_path={d}/ds/empty_text_document", "no documents"),
    ("train {d}/model.yml --set save={d}/afile/run", "checkpoint.save"),
    ("train {d}/model.yml --set log_dir={d}/afile/logs", "logging.log_dir"),
    # a new run into a finished run's directory, and a load directory that is not there (a typo)
    ("train {d}/model.yml --set save={d}/run", "already holds a run's checkpoints (newest iter_0000001)"),
    ("train {d}/model.yml --set load={d}/rnu", "checkpoint.load"),
    ("train {d}/model.yml --set eval_interval=-1", "eval_interval"),
    ("train {d}/model.yml --set max_runtime=2x", "'2x' is not a duration"),
    ("train {d}/model.yml --set save={d}/o/mr --set max_runtime=0:00:00", "more than 0 seconds"),
    ("train {d}/model.yml --set max_runtime=1h", "needs checkpoint.save"),
    ("train {d}/model.yml --set hang_timeout=-1", "key 'hang_timeout': must be a number of seconds > 0"),
    # checkpoint
    ("checkpoint consolidate {d}/notckpt {d}/o/m.pt", "notckpt"),
    ("checkpoint consolidate {d}/nolatest {d}/o/m.pt", "'latest'"),
    ("checkpoint consolidate {d}/stale {d}/o/m.pt", "iter_0000009"),
    ("checkpoint consolidate {d}/noshard {d}/o/m.pt", "noshard"),
    ("checkpoint consolidate {d}/run {d}/afile/m.pt", "afile"),
    # generate
    ("generate {d}/notckpt --prompt hi", "notckpt"),
    ("generate {d}/badconfig --prompt hi", "config.yml: line 2"),
    ("generate {d}/run --prompt hi --max-new-tokens -1", "--max-new-tokens"),
    ("generate {d}/run --input-file {d}/prompts.jsonl --batch-size 0", "--batch-size"),
    ("generate {d}/run --prompt hi --top-p 1.5", "top_p"),
    ("generate {d}/run --prompt hi --temperature -1", "temperature"),
    ("generate {d}/run --prompt hi --max-new-tokens 500", "max_position_embeddings"),
    ("generate {d}/run --prompt hi --device bogus", "--device"),
    ("generate {d}/run --input-file {d}/nope.txt", "nope.txt"),
    ("generate {d}/run --input-file {d}/prompts.jsonl", "prompts.jsonl:2: bad JSON: Expecting value at column 12"),
    ("generate {d}/run --input-file {d}/literal.jsonl", "literal.jsonl:2: not a JSON object"),
    ("generate {d}/run --prompt hi --set foo=1", "'foo'"),
    ("generate {d}/run --prompt hi --output-file {d}/afile/out.jsonl", "afile"),
    # eval
    ("eval {d}/notckpt --tasks lambada_openai", "notckpt"),
    ("eval {d}/run --tasks , ", "--tasks"),
    ("eval {d}/run --tasks lambada_openai --limit -1", "--limit"),
    ("eval {d}/run --tasks lambada_openai --include-path {d}/nope", "nope"),
    ("eval {d}/run --tasks lambada_openai --output {d}/afile/r", "afile"),
    # (an unknown task name: tests/interop/test_lm_eval.py, where lm-eval's slow task index is already built)
    # export / import
    ("export hf {d}/notckpt {d}/o/hf", "notckpt"),
    ("export hf {d}/alibi {d}/o/hf", "model.pos_emb"),
    ("export hf {d}/run {d}/afile/hf", "afile"),
    ("import hf {d}/notckpt {d}/o/imp", "config.json"),
    ("import hf {d}/notype {d}/o/imp", "config.json"),
    ("import hf {d}/gpt2 {d}/o/imp", "model_type='gpt2'"),
    ("import hf {d}/neoxcfg {d}/run", "already holds checkpoints"),
    ("import hf {d}/neoxcfg {d}/afile/imp", "afile"),
    # mup coord-check (flags and the width list are checked before any training)
    ("mup coord-check {d}/model.yml --widths 64", "--widths"),
    ("mup coord-check {d}/model.yml --widths 64,x", "--widths"),
    ("mup coord-check {d}/model.yml --widths 32,33 --steps 1", "33 is not divisible by num_attention_heads"),
    ("mup coord-check {d}/model.yml --widths 32,64 --steps 0", "--steps"),
    ("mup coord-check {d}/model.yml --widths 32,64 --out {d}/afile/c.png", "afile"),
    ("mup coord-check {d}/nope.yml --widths 32,64", "nope.yml"),
    # prepare (the folder is checked before any download)
    ("prepare nosuchcorpus", "nosuchcorpus"),
    ("prepare tinyshakespeare --out {d}/afile/ts", "afile"),
    ("prepare tinyshakespeare --out {d}/ts --sha256 abc", "--sha256"),
    ("prepare piqa --out {d}/ev --sha256 " + "0" * 64, "--sha256: piqa has 2 files"),
]


@pytest.mark.parametrize("argv,named", CASES, ids=[c[0].split(" {d}")[0] + ": " + c[1] for c in CASES])
def test_bad_input_is_one_line_error(d, capsys, argv, named):
    args = [a.format(d=d) for a in argv.split()]
    code = main(args)
    err = capsys.readouterr().err
    # skipped-line warnings may come first (preprocess without --strict); the error is the one other line
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert lines[0].startswith(f"neox {args[0]}: error: "), lines[0]
    assert named in lines[0], lines[0]
