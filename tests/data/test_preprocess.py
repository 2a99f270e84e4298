"""`neox preprocess`: formats, order under workers, malformed input, labels, atomic output, CLI and shim."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from neox.cli import main as cli
from neox.data.indexed import IndexedDataset
from neox.data.preprocess import PreprocessOptions, _ordered_map, mask_label, preprocess
from neox.data.tokenizers import ByteLevelTokenizer
from neox.errors import ConfigError, DataError, NeoxError

ROOT = Path(__file__).resolve().parents[2]
BYTES = NS(tokenizer_type="ByteLevelTokenizer", vocab_file=None, merge_file=None)
EOD = 256


def _docs(prefix):
    ds = IndexedDataset(prefix)
    assert ds.doc_idx.tolist() == list(range(len(ds) + 1))  # one item per document
    return [ds[i].tolist() for i in range(len(ds))]


def _jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _run(tmp_path, inputs, name="out", tok=BYTES, **kw):
    opts = PreprocessOptions(inputs=inputs, output_prefix=str(tmp_path / name), progress=False, **kw)
    return preprocess(opts, tok)


TEXTS = [f"document {i} " + "x" * (i % 7) + " é🙂" * (i % 3) for i in range(60)]


@pytest.mark.parametrize("workers", [1, 3])
def test_order_and_tokens_any_workers(tmp_path, workers):
    src = _jsonl(tmp_path / "a.jsonl", TEXTS)
    s = _run(tmp_path, [src], append_eod=True, workers=workers, batch_bytes=50)
    want = [list(t.encode()) + [EOD] for t in TEXTS]
    assert _docs(s.outputs["text"]) == want
    assert (s.documents, s.tokens, s.skipped, s.dtype) == (60, sum(map(len, want)), 0, "uint16")
    assert s.outputs == {"text": str(tmp_path / "out_text_document")}
    assert s.bytes == Path(src).stat().st_size


def test_reading_runs_a_bounded_distance_ahead_of_the_workers():
    # What keeps memory flat: the reader may be at most 2 * workers batches ahead of the writer.
    consumed = []

    def items():
        for i in range(40):
            consumed.append(i)
            yield -i

    initargs = (ByteLevelTokenizer(), PreprocessOptions(inputs=[], output_prefix=""), "<u2", True)
    results = _ordered_map(abs, items(), 2, initargs)
    assert next(results) == 0 and len(consumed) <= 5
    assert list(results) == list(range(1, 40))


def test_a_dead_worker_fails_the_run_instead_of_hanging_it():
    initargs = (ByteLevelTokenizer(), PreprocessOptions(inputs=[], output_prefix=""), "<u2", True)
    with pytest.raises(NeoxError, match="worker process died"):
        list(_ordered_map(os._exit, [3, 3], 2, initargs))


def test_compressed_text_modes_lists_and_globs(tmp_path):
    import zstandard

    (tmp_path / "in").mkdir()
    raw = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]).encode()
    (tmp_path / "in/a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "in/b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    txt = tmp_path / "c.txt"
    txt.write_text("para one\nline two\n\n\npara two\n")
    s = _run(tmp_path, [str(tmp_path / "in/*.jsonl*") + "," + str(txt)])
    assert _docs(s.outputs["text"]) == [list(t.encode()) for t in TEXTS[:3] * 2] + [
        list(b"para one\nline two\n\n\npara two\n")
    ]
    para = _run(tmp_path, [str(txt)], name="p", text_mode="paragraph")
    assert _docs(para.outputs["text"]) == [list(b"para one\nline two\n"), list(b"para two\n")]
    lines = _run(tmp_path, [str(txt)], name="l", text_mode="line")
    assert _docs(lines.outputs["text"]) == [list(b"para one"), list(b"line two"), list(b"para two")]
    d = _run(tmp_path, [str(tmp_path / "in")], name="d")  # a directory means its input files
    assert d.documents == 6


def test_long_text_document_is_split_for_workers_but_stays_one_item(tmp_path, shared_data):
    shakes = (shared_data / "corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:30000]
    (tmp_path / "s.txt").write_text(shakes, encoding="utf-8")
    vocab = str(shared_data / "tokenizers/gpt2.json")
    tok = NS(tokenizer_type="HFTokenizer", vocab_file=vocab, merge_file=None)
    s = _run(tmp_path, [str(tmp_path / "s.txt")], tok=tok, workers=2, batch_bytes=4096, append_eod=True)
    from tokenizers import Tokenizer

    assert _docs(s.outputs["text"]) == [Tokenizer.from_file(vocab).encode(shakes).ids + [50256]]


def test_malformed_lines_are_reported_and_skipped(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(
        b'{"text": "ok one"}\n'
        b'{"text": "broken\n'
        b'{"other": "x"}\n'
        b'{"text": 5}\n'
        b'{"text": "bad \xff utf8"}\n'
        b"[1, 2]\n"
        b"\n"
        b'{"text": ""}\n'
        b'{"text": "ok two"}\n'
    )
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"good line\nbad \xfe line\nmore\n")
    s = _run(tmp_path, [str(src), str(txt)], workers=2, batch_bytes=10)
    err = capsys.readouterr().err
    # the file's line number and a place within the line, not json's own "line 2 column 1 (char 17)"
    assert f"{src}:2: bad JSON: Invalid control character at the end of the line" in err
    assert "column" not in err
    assert f"{src}:3: missing key 'text'" in err
    assert f"{src}:4: key 'text' is int, not a string" in err
    assert f"{src}:5: invalid UTF-8 at byte 14" in err
    assert f"{src}:6: expected a JSON object, got list" in err
    assert f"{txt}:2: invalid UTF-8 at byte 4" in err
    assert (s.skipped, s.empty) == (6, 1)
    assert _docs(s.outputs["text"]) == [list(b"ok one"), list(b"ok two"), list(b"good line\nmore\n")]
    assert "skipped 6 malformed, 1 empty" in s.line()


def test_strict_stops_at_first_bad_line_and_leaves_nothing(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", TEXTS[:5])
    with open(src, "ab") as f:
        f.write(b'{"text": nope}\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=rf"{src}:6: bad JSON: Expecting value at column 10 \(--strict"):
        _run(tmp_path, [src], strict=True, workers=2, batch_bytes=20)
    assert list(tmp_path.glob("out*")) == []


def test_labels_mask_before_token_and_prompt_key(tmp_path):
    assert mask_label(np.array([5, 1, 2, 3, 1, 2]), [1, 2]).tolist() == [-100, -100, -100, 3, 1, 2]
    assert mask_label(np.array([5, 6]), [1, 2]).tolist() == [5, 6]  # no delimiter: nothing masked (GPT-NeoX)
    src = _jsonl(tmp_path / "qa.jsonl", ["Q: hi A: yo", "no delimiter"])
    s = _run(tmp_path, [src], append_eod=True, mask_before_token=list(b"A:"))
    text = IndexedDataset(s.outputs["text"])
    label = IndexedDataset(s.outputs["label"])
    assert label.dtype == np.int32 and label.sizes.tolist() == text.sizes.tolist()
    assert label[0].tolist() == [-100] * 8 + list(b" yo") + [EOD]
    assert label[1].tolist() == text[1].tolist()
    pk = tmp_path / "pk.jsonl"
    pk.write_text(json.dumps({"prompt": "Q?", "text": "A."}) + "\n")
    s = _run(tmp_path, [str(pk)], name="pk", append_eod=True, prompt_key="prompt")
    assert _docs(s.outputs["text"]) == [list(b"Q?A.") + [EOD]]
    assert IndexedDataset(s.outputs["label"])[0].tolist() == [-100, -100] + list(b"A.") + [EOD]
    with pytest.raises(ConfigError, match="exactly one key"):
        _run(tmp_path, [src], json_keys=["a", "b"], prompt_key="p")


def test_label_dataset_feeds_gpt2_dataset(tmp_path):
    from neox.data.sampling import GPT2Dataset

    src = _jsonl(tmp_path / "qa.jsonl", [f"Q{i} A: answer {i}" for i in range(20)])
    s = _run(tmp_path, [src], append_eod=True, mask_before_token=list(b"A:"))
    text, label = IndexedDataset(s.outputs["text"]), IndexedDataset(s.outputs["label"])
    ds = GPT2Dataset(
        "train",
        s.outputs["text"],
        np.arange(len(text)),
        text,
        8,
        16,
        1234,
        label_dataset=label,
        cache_dir=str(tmp_path / "cache"),
    )
    item = ds[0]
    assert item["text"].shape == item["label"].shape == (17,)
    masked = item["label"] == -100
    assert masked.any() and (item["label"][~masked] == item["text"][~masked]).all()


def test_ftfy_repairs_mojibake(tmp_path):
    src = _jsonl(tmp_path / "m.jsonl", ["schÃ¶n"])
    assert _docs(_run(tmp_path, [src], ftfy=True).outputs["text"]) == [list("schön".encode())]
    assert _docs(_run(tmp_path, [src], name="raw").outputs["text"]) == [list("schÃ¶n".encode())]


def test_several_json_keys_make_aligned_datasets(tmp_path):
    src = tmp_path / "k.jsonl"
    src.write_text('{"title": "T1", "body": "B1"}\n{"title": "T2", "body": "B2"}\n')
    s = _run(tmp_path, [str(src)], json_keys=["title", "body"])
    assert _docs(s.outputs["title"]) == [list(b"T1"), list(b"T2")]
    assert _docs(s.outputs["body"]) == [list(b"B1"), list(b"B2")]


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        _run(tmp_path, [str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="matches no files"):
        _run(tmp_path, [str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unknown input type"):
        _run(tmp_path, [str(tmp_path / "x.csv")])
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:30])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: corrupt or truncated"):
        _run(tmp_path, [str(tmp_path / "t.jsonl.gz")])
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        _run(tmp_path, [_jsonl(tmp_path / "ok.jsonl", ["a"])], tok=NS(tokenizer_type="Nope"))
    assert list(tmp_path.glob("out*")) == []


def test_cli_and_gpt_neox_shim(tmp_path, capsys):
    src = _jsonl(tmp_path / "a.jsonl", TEXTS[:4])
    rc = cli(
        [
            "preprocess",
            "--input",
            src,
            "--output-prefix",
            str(tmp_path / "c"),
            "--append-eod",
            "--tokenizer-type",
            "CharLevelTokenizer",
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("neox preprocess: 4 documents,")
    assert _docs(str(tmp_path / "c_text_document"))[0] == list(TEXTS[0].encode()) + [0]
    rc = cli(["preprocess", "--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "c")])
    assert rc == 2 and "neox preprocess: error: --input:" in capsys.readouterr().err
    # GPT-NeoX's own command line, spelled as in its README, at its path (and at neox's older one)
    for tool in ("tools/datasets/preprocess_data.py", "tools/preprocess_data.py"):
        _gpt_neox_tool(tmp_path, tool, src)
        assert _docs(str(tmp_path / "g_text_document")) == _docs(str(tmp_path / "c_text_document"))


def _gpt_neox_tool(tmp_path, tool, src, *extra):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / tool),
            "--input",
            src,
            "--output-prefix",
            str(tmp_path / "g"),
            "--vocab",
            "unused.json",
            "--tokenizer-type",
            "CharLevelTokenizer",
            "--dataset-impl",
            "mmap",
            "--append-eod",
            "--workers",
            "1",
            "--log-interval",
            "10",
            "--jsonl-keys",
            "text",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr


def test_gpt_neox_mask_tool(tmp_path):
    # tools/datasets/preprocess_data_with_mask.py as GPT-NeoX documents it: CharLevelTokenizer ids are the
    # bytes (0 is EOD), so "A:" is 65,58, and everything up to and including it is -100 in the label dataset
    src = _jsonl(tmp_path / "qa.jsonl", ["Q: hi A: yo"])
    _gpt_neox_tool(tmp_path, "tools/datasets/preprocess_data_with_mask.py", src, "--mask-before-token", "65,58")
    text = list(b"Q: hi A: yo") + [0]
    assert _docs(str(tmp_path / "g_text_document")) == [text]
    assert _docs(str(tmp_path / "g_label_document")) == [[-100] * 8 + text[8:]]


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_eod_token_names_the_end_of_document_token(tmp_path, capsys, workers):
    """A tokenizer file whose end token is none of the usual names: --eod-token says which one --append-eod adds."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_end|>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "chat.json"))
    src = _jsonl(tmp_path / "a.jsonl", ["hello world", "world"])
    base = [
        "preprocess",
        "--input",
        src,
        "--output-prefix",
        str(tmp_path / "c"),
        "--append-eod",
        "--tokenizer-type",
        "HFTokenizer",
        "--vocab-file",
        str(tmp_path / "chat.json"),
        "--workers",
        str(workers),
    ]
    assert cli(base) == 2
    assert "set tokenizer.eod_token" in capsys.readouterr().err
    assert cli(base + ["--eod-token", "<|im_end|>"]) == 0
    assert _docs(str(tmp_path / "c_text_document")) == [[2, 3, 1], [3, 1]]
    assert cli(base + ["--eod-token", "<|eot|>"]) == 2
    assert "tokenizer.eod_token: '<|eot|>' is not a token of" in capsys.readouterr().err
