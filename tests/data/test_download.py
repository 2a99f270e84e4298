"""Every `neox prepare` download is checksum-verified: pinned sums, --sha256, and the first-download record for a
source that publishes none. A tampered download is one line and leaves no file behind."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest

from neox.cli import main as cli
from neox.data import corpora
from neox.data.corpora import Corpus, Source
from neox.data.download import TRUST_FILE, recorded
from neox.data.eval_sets import EVAL_SETS

ENWIK8_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_every_registry_download_has_a_pinned_sha256_but_pile_00():
    pins = {name: [s.sha256 for s in c.sources] for name, c in corpora.CORPORA.items()} | {
        name: [s.sha256 for s, _ in e.downloads] for name, e in EVAL_SETS.items()
    }
    unpinned = sorted(name for name, sums in pins.items() if None in sums)
    assert unpinned == ["pile_00"]  # the one whose publisher's SHA256SUMS.txt could not be read to pin it
    for name, sums in pins.items():
        assert all(s is None or (len(s) == 64 and int(s, 16) >= 0 and s == s.lower()) for s in sums), name
    assert corpora.CORPORA["enwik8"].sources[0].sha256 == ENWIK8_SHA256


def test_tinyshakespeare_pin_is_the_shared_copy(shared_data):
    data = (shared_data / "corpora" / "tinyshakespeare.txt").read_bytes()
    assert corpora.CORPORA["tinyshakespeare"].sources[0].sha256 == _sha(data)


def _fake_enwik8() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("enwik8", b"<mediawiki>\n  <page>x</page>\n")
    return buf.getvalue()


def test_tampered_enwik8_is_one_line_and_leaves_nothing(server, tmp_path, capsys):
    server.files["enwik8.zip"] = _fake_enwik8()  # not the real file: its sha256 differs from the pin
    out = tmp_path / "e"
    assert cli(["prepare", "enwik8", "--out", str(out), "--mirror", server.base, "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"does not match the expected {ENWIK8_SHA256} (neox's pinned checksum)" in line
    assert "the download was deleted" in line
    assert _files(out) == []  # no .part, no enwik8.zip, no enwik8.jsonl
    # --sha256 accepts another version on purpose (here: the fake's own checksum)
    rc = cli(
        ["prepare", "enwik8", "--out", str(out), "--mirror", server.base, "--quiet", "--sha256", _sha(_fake_enwik8())]
    )
    assert rc == 0 and _files(out) == ["enwik8.jsonl", "enwik8.zip"]


def test_a_damaged_file_already_in_place_is_refused(server, tmp_path, shared_data, capsys):
    data = (shared_data / "corpora" / "tinyshakespeare.txt").read_bytes()
    server.files["input.txt"] = data
    out = tmp_path / "ts"
    out.mkdir()
    (out / "input.txt").write_bytes(data[:-10])  # a download cut short by hand, renamed as if finished
    assert cli(["prepare", "tinyshakespeare", "--out", str(out), "--mirror", server.base, "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{out / 'input.txt'}: sha256" in line and "run with -f" in line
    assert not (out / "tinyshakespeare.jsonl").exists() and server.requests == []
    assert cli(["prepare", "tinyshakespeare", "--out", str(out), "--mirror", server.base, "--quiet", "-f"]) == 0
    assert (out / "input.txt").read_bytes() == data


@pytest.fixture
def unpinned(monkeypatch):
    """A corpus whose source publishes no checksum (as pile_00's)."""
    src = Source("https://example.invalid/pub/story.txt")
    monkeypatch.setitem(corpora.CORPORA, "story", Corpus("story", (src,), "paragraphs", "test corpus, no checksum"))


def test_first_download_without_checksum_is_recorded_and_later_ones_must_match(unpinned, server, tmp_path, capsys):
    first, second = b"A:\nonce\n\nB:\nupon\n", b"A:\nonce\n\nB:\nupon a time\n"
    server.files["story.txt"] = first
    out = tmp_path / "story"
    assert cli(["prepare", "story", "--out", str(out), "--mirror", server.base, "--quiet"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: story.txt has no published checksum")
    assert _sha(first) in warning[0] and str(out / TRUST_FILE) in warning[0]
    assert recorded(str(out)) == {"story.txt": _sha(first)}
    assert (out / TRUST_FILE).read_text() == f"{_sha(first)}  story.txt\n"  # sha256sum -c reads it

    server.files["story.txt"] = second  # the server now has other bytes under the same name
    assert cli(["prepare", "story", "--out", str(out), "--mirror", server.base, "--quiet", "-f"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"does not match the expected {_sha(first)} (recorded at its first download in {out / TRUST_FILE})" in line
    # -f removed the earlier download and the wrong one left nothing; the JSONL made before is untouched
    assert _files(out) == [TRUST_FILE, "story.jsonl"]
    assert "".join(json.loads(line)["text"] for line in open(out / "story.jsonl")) == first.decode()

    # pinning the new version on purpose replaces the record; a rerun then needs no flag
    rc = cli(
        ["prepare", "story", "--out", str(out), "--mirror", server.base, "--quiet", "-f", "--sha256", _sha(second)]
    )
    assert rc == 0 and recorded(str(out)) == {"story.txt": _sha(second)}
    assert "warning" not in capsys.readouterr().err
    assert cli(["prepare", "story", "--out", str(out), "--mirror", server.base, "--quiet", "-f"]) == 0
    texts = [json.loads(line)["text"] for line in open(out / "story.jsonl")]
    assert "".join(texts) == second.decode()


def test_sha256_flag_errors(server, tmp_path, capsys):
    assert cli(["prepare", "tinyshakespeare", "--out", str(tmp_path), "--sha256", "abc"]) == 2
    assert "--sha256: 'abc' is not a sha256 (64 hex digits" in _one_error_line(capsys.readouterr().err)
    assert cli(["prepare", "piqa", "--out", str(tmp_path), "--sha256", "0" * 64]) == 2
    assert "--sha256: piqa has 2 files" in _one_error_line(capsys.readouterr().err)
    assert cli(["prepare", "stdlib", "--out", str(tmp_path), "--sha256", "0" * 64]) == 2
    (tmp_path / TRUST_FILE).write_text("not a checksum line\n")
    with pytest.raises(Exception, match=rf"{TRUST_FILE}:1: expected 'SHA256  FILE'"):
        recorded(str(tmp_path))
