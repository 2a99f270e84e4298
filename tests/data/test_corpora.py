"""Corpus downloads against a local HTTP server (Range, resume, sha256), the JSONL forms, and `stdlib`."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest

from neox.cli import main as cli
from neox.data import corpora
from neox.data.corpora import Corpus, Source, build_stdlib_corpus, download, paragraphs, wiki_pages
from neox.errors import DataError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PAYLOAD = bytes(range(256)) * 400  # 100 KiB


def test_resume_from_part_file_with_range(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:30000])
    download(f"{server.base}/f.bin", str(dest), _sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    assert server.requests == [("/f.bin", "bytes=30000-")]


def test_interrupted_download_resumes_on_rerun(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    server.cut_after = 12345
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match="run the same command again"):
        download(f"{server.base}/f.bin", str(dest), _sha(PAYLOAD), progress=False)
    assert (tmp_path / "f.bin.part").stat().st_size == 12345
    download(f"{server.base}/f.bin", str(dest), _sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/f.bin", "bytes=12345-")


def test_server_without_range_restarts_and_bad_checksum_is_deleted(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    server.honour_range = False
    (tmp_path / "f.bin.part").write_bytes(b"garbage!")
    download(f"{server.base}/f.bin", str(tmp_path / "f.bin"), _sha(PAYLOAD), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD

    with pytest.raises(DataError, match="does not match the expected"):
        download(f"{server.base}/f.bin", str(tmp_path / "g.bin"), _sha(b"something else"), progress=False)
    assert not (tmp_path / "g.bin").exists() and not (tmp_path / "g.bin.part").exists()
    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{server.base}/missing", str(tmp_path / "m"), None, progress=False)


def test_prepare_jsonl_zst_and_enwik8_forms_via_mirror(server, tmp_path, monkeypatch):
    import zstandard

    docs = [{"text": f"document {i}\n" * (i + 1), "meta": {"i": i}} for i in range(5)]
    raw = "".join(json.dumps(d) + "\n" for d in docs).encode()
    zst = zstandard.ZstdCompressor().compress(raw)
    wiki = "<mediawiki>\n  <siteinfo/>\n  <page>\n    <title>A</title>\n  </page>\n  <page>\n  B</page>\n"
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("enwik8", wiki.encode())
    server.files.update({"small.jsonl.zst": zst, "enwik8.zip": zbuf.getvalue()})
    monkeypatch.setitem(
        corpora.CORPORA,
        "small",
        Corpus("small", (Source("https://example.invalid/x/small.jsonl.zst", _sha(zst)),), "jsonl.zst", "test corpus"),
    )
    # a made-up enwik8.zip: the registry's pinned checksum is the real file's, so this entry pins the fake's
    fake = Source("http://example.invalid/dc/enwik8.zip", _sha(zbuf.getvalue()))
    monkeypatch.setitem(corpora.CORPORA, "enwik8", Corpus("enwik8", (fake,), "enwik8", "test enwik8"))
    monkeypatch.setenv(corpora.MIRROR_ENV, server.base + "/")

    out = corpora.prepare("small", str(tmp_path / "small"), progress=False)
    assert open(out, "rb").read() == raw
    out = corpora.prepare("enwik8", str(tmp_path / "e"), progress=False)
    pages = [json.loads(line)["text"] for line in open(out, encoding="utf-8")]
    assert len(pages) == 3 and "".join(pages) == wiki and pages[1].startswith("  <page>")


def test_tinyshakespeare_checksum_and_url_override(server, tmp_path, shared_data):
    data = (shared_data / "corpora" / "tinyshakespeare.txt").read_bytes()
    server.files["input.txt"] = data
    server.files["wrong.txt"] = data[:-1]
    rc = cli(["prepare", "tinyshakespeare", "-d", str(tmp_path), "--mirror", server.base, "--quiet"])
    assert rc == 0
    texts = [json.loads(line)["text"] for line in open(tmp_path / "tinyshakespeare" / "tinyshakespeare.jsonl")]
    assert "".join(texts) == data.decode() and len(texts) > 1000
    assert texts[0].startswith("First Citizen:\nBefore we proceed")
    # --url must still be the same file: the registry checksum applies.
    rc = cli(
        ["prepare", "tinyshakespeare", "--out", str(tmp_path / "bad"), "--url", f"{server.base}/wrong.txt", "--quiet"]
    )
    assert rc == 2 and not (tmp_path / "bad" / "tinyshakespeare.jsonl").exists()


def test_splitters_round_trip():
    text = "A:\nhi\n\nB:\nyo\n\n\nC:\nend\n"
    assert paragraphs(text) == ["A:\nhi\n\n", "B:\nyo\n\n\n", "C:\nend\n"]
    assert "".join(wiki_pages("x\n<page>1</page>\n <page>2")) == "x\n<page>1</page>\n <page>2"


def test_stdlib_corpus_fake_tree(tmp_path):
    root = tmp_path / "lib"
    for rel, body in {
        "b.py": b"b = 1\n",
        "a/z.py": b"# -*- coding: latin-1 -*-\ns = '\xe9'\n",
        "a/y.txt": b"not python",
        "test/t.py": b"skip",
        "site-packages/p.py": b"skip",
        "a/tests/t.py": b"skip",
        "a/__init__.py": b"",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    out = build_stdlib_corpus(str(tmp_path / "out"), root=str(root))
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["path"] for r in rows] == ["a/__init__.py", "a/z.py", "b.py"]
    assert rows[1]["text"] == "# -*- coding: latin-1 -*-\ns = '\u00e9'\n"


def test_stdlib_corpus_is_deterministic(tmp_path):
    assert cli(["prepare", "stdlib", "--out", str(tmp_path / "one")]) == 0
    first = (tmp_path / "one" / "stdlib.jsonl").read_bytes()
    build_stdlib_corpus(str(tmp_path / "two"))
    assert (tmp_path / "two" / "stdlib.jsonl").read_bytes() == first
    assert 2e6 < len(first) < 25e6
    paths = [json.loads(line)["path"] for line in first.decode().splitlines()]
    assert paths == sorted(paths) and "os.py" in paths
    assert not any(p.startswith(("test/", "site-packages/")) for p in paths)


def test_prepare_then_tokenize(server, tmp_path, shared_data):
    from neox.data.indexed import IndexedDataset

    server.files["input.txt"] = (shared_data / "corpora" / "tinyshakespeare.txt").read_bytes()
    rc = cli(
        [
            "prepare",
            "tinyshakespeare",
            "-d",
            str(tmp_path),
            "--mirror",
            server.base,
            "--quiet",
            "-t",
            "ByteLevelTokenizer",
        ]
    )
    assert rc == 0
    ds = IndexedDataset(str(tmp_path / "tinyshakespeare" / "tinyshakespeare_text_document"))
    lines = open(tmp_path / "tinyshakespeare" / "tinyshakespeare.jsonl").readlines()
    assert len(ds) == len(lines)
    # Byte-level: one token per byte of the speech plus the appended EOD.
    first = json.loads(lines[0])["text"].encode()
    assert len(ds[0]) == len(first) + 1


# the upstream file name each eval-set download has, and its copy in the shared data folder
UPSTREAM = {
    "lambada_test.jsonl": "eval/lambada_openai_test.jsonl",
    "valid.jsonl": "eval/piqa_valid.jsonl",
    "valid-labels.lst": "eval/piqa_valid-labels.lst",
    "test.txt": "corpora/wikitext-2/test.txt",
}


def test_prepare_eval_sets_match_the_shared_copies(server, tmp_path, shared_data, monkeypatch):
    for name, rel in UPSTREAM.items():
        server.files[name] = (shared_data / rel).read_bytes()
    monkeypatch.setenv(corpora.EVAL_DATA_ENV, str(tmp_path / "eval-data"))
    for name in ("lambada", "piqa", "wikitext2"):
        assert cli(["prepare", name, "--mirror", server.base, "--quiet"]) == 0
    written = sorted(str(p.relative_to(tmp_path / "eval-data")) for p in (tmp_path / "eval-data").rglob("*.*"))
    # the downloads and the files built from them (PIQA with labels, WikiText-2 by article) are the shared
    # folder's, byte for byte: the built ones were made there independently of this code
    expected = sorted([*UPSTREAM.values(), "eval/piqa_valid_labeled.jsonl", "corpora/wikitext-2/test_articles.jsonl"])
    assert written == expected
    for rel in expected:
        assert (tmp_path / "eval-data" / rel).read_bytes() == (shared_data / rel).read_bytes(), rel
    # a second run fetches nothing
    before = len(server.requests)
    assert cli(["prepare", "piqa", "--mirror", server.base, "--quiet"]) == 0 and len(server.requests) == before


def test_eval_set_default_folder_checksum_and_flags(server, tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.delenv(corpora.EVAL_DATA_ENV, raising=False)
    monkeypatch.delenv(corpora.OLD_EVAL_DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = (shared_data / "eval" / "lambada_openai_test.jsonl").read_bytes()
    server.files.update({"lambada_test.jsonl": good, "bad.jsonl": good[:-1]})
    assert cli(["prepare", "lambada", "--url", f"{server.base}/lambada_test.jsonl", "--quiet"]) == 0
    assert (tmp_path / "cache" / "neox" / "eval-data" / "eval" / "lambada_openai_test.jsonl").read_bytes() == good
    capsys.readouterr()
    assert cli(["prepare", "lambada", "--out", str(tmp_path / "x"), "--url", f"{server.base}/bad.jsonl"]) == 2
    assert "does not match the expected 4aa8d02c" in capsys.readouterr().err
    assert not list((tmp_path / "x").rglob("*.jsonl*"))
    assert cli(["prepare", "piqa", "-d", str(tmp_path / "d")]) == 2
    assert "-d/--data-dir: piqa is an eval set" in capsys.readouterr().err
    assert cli(["prepare", "piqa", "--url", f"{server.base}/valid.jsonl"]) == 2
    assert "--url: piqa has 2 files; use --mirror" in capsys.readouterr().err


def test_wikitext_articles_and_piqa_labels(tmp_path):
    text = " \n = A = \n \n a text\n \n = = Sub = = \n \n more\n \n = B = \n \n b\n = not a title = \n"
    assert corpora.wikitext_articles(text) == [
        " \n = A = \n \n a text\n \n = = Sub = = \n \n more\n",
        " \n = B = \n \n b\n = not a title = \n",
    ]
    (tmp_path / "q.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "l.lst").write_text("1\n")
    assert list(corpora.piqa_labeled(tmp_path / "q.jsonl", tmp_path / "l.lst")) == [
        {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}
    ]
    (tmp_path / "l.lst").write_text("1\n0\n")
    with pytest.raises(DataError, match="2 labels for the 1 questions"):
        list(corpora.piqa_labeled(tmp_path / "q.jsonl", tmp_path / "l.lst"))
