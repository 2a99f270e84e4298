"""Downloads for `neox prepare`: resumable, mirrorable, checksum-verified; and the JSONL files made from them.

Bytes go to ``FILE.part`` and a rerun asks the server for the rest with an HTTP Range request. ``mirror`` (or
``NEOX_CORPUS_MIRROR``) replaces every URL's directory, so air-gapped sites and tests can serve the same file
names locally.

Every download is checked against a sha256 before it takes its final name; a mismatch deletes the bytes, so no
partial or wrong file is left, and is one line. The expected checksum is, in order: ``--sha256`` (one file),
the registry's pin, else the one recorded in the download folder's ``SHA256SUMS`` (``sha256sum -c`` format)
by the first download of a file whose source publishes none. That first download is trusted as it comes, with
a one-line warning; every later one (``-f``, another ``--url`` or mirror) must match it. A file already in
place is checked too before it is used.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from neox.errors import DataError, NeoxError

MIRROR_ENV = "NEOX_CORPUS_MIRROR"
TRUST_FILE = "SHA256SUMS"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlparse(self.url).path)


def source_url(source: Source, mirror: str | None) -> str:
    """The URL to fetch: the registry's, or the same file name under ``mirror``."""
    if not mirror:
        return source.url
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(source.filename)}"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _progress(total: int | None, initial: int, name: str, show: bool | None):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if show is None else show
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def download(
    url: str,
    dest: str,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
    expected_from: str = "",
) -> str:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a partial file; verify ``sha256``.

    A finished ``dest`` is not fetched again. A server that ignores the Range request makes the download
    start over. On a checksum mismatch the bad bytes are deleted and a DataError says so. ``sha256=None``
    verifies nothing: `fetch` passes it only for a first download whose checksum it then records.
    """
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "neox-prepare"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is already whole
            return _finish(part, dest, url, sha256, expected_from)
        raise DataError(
            f"{url}: HTTP {e.code} {e.reason}; check the URL or pass --mirror/--url "
            f"(or set {MIRROR_ENV}) to fetch from another server"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"{url}: cannot connect ({reason}); without network, pass --mirror/--url (or set "
            f"{MIRROR_ENV}) to a server that has {os.path.basename(dest)}"
        ) from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server sent the whole file; start again from byte 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        got = have
        bar = _progress(total, have, os.path.basename(dest), progress)
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise DataError(
                f"{url}: download interrupted after {got} bytes ({e}); run the same command again to resume from {part}"
            ) from None
        finally:
            bar.close()
    if total is not None and got < total:
        raise DataError(
            f"{url}: connection closed after {got} of {total} bytes; run the same command again to resume from {part}"
        )
    return _finish(part, dest, url, sha256, expected_from)


def _finish(part: str, dest: str, url: str, sha256: str | None, expected_from: str) -> str:
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256.lower():
        os.remove(part)
        where = f" ({expected_from})" if expected_from else ""
        raise DataError(
            f"{url}: sha256 {digest} does not match the expected {sha256}{where}; the download was deleted. "
            f"Run again, or use --mirror/--url pointing at a correct copy (--sha256 HEX for another version)"
        )
    os.replace(part, dest)
    return dest


def check_sha256(value: str | None, flag: str = "--sha256") -> str | None:
    """A checksum given by the user: 64 hex digits (any case), returned lower-case."""
    if value is None:
        return None
    if not _HEX64.match(value.strip()):
        raise NeoxError(f"{flag}: {value!r} is not a sha256 (64 hex digits, as sha256sum prints)")
    return value.strip().lower()


def recorded(out_dir: str) -> dict[str, str]:
    """{path under out_dir: sha256} from ``out_dir/SHA256SUMS`` (empty when there is none)."""
    path = os.path.join(out_dir, TRUST_FILE)
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            digest, _, name = line.strip().partition("  ")
            if not line.strip():
                continue
            if not _HEX64.match(digest) or not name:
                raise DataError(f"{path}:{n}: expected 'SHA256  FILE' (sha256sum format); fix or delete the line")
            out[name] = digest.lower()
    return out


def _record(out_dir: str, rel: str, digest: str) -> str:
    """Add (or replace) ``rel``'s line in ``out_dir/SHA256SUMS``, atomically; returns the file's path."""
    path = os.path.join(out_dir, TRUST_FILE)
    entries = {**recorded(out_dir), rel: digest}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{d}  {n}\n" for n, d in sorted(entries.items()))
    os.replace(tmp, path)
    return path


def _check_in_place(dest: str, expected: str, where: str) -> None:
    digest = sha256_of(dest)
    if digest != expected:
        raise DataError(
            f"{dest}: sha256 {digest} does not match the expected {expected} ({where}); the file is damaged or "
            f"another version: delete it or run with -f to download it again"
        )


def fetch(name: str, files: list, out_dir: str, mirror, url, force: bool, progress, sha256: str | None = None):
    """Download each (Source, path under out_dir), verified; returns the local paths.

    ``url`` replaces the one source's URL (keeping its checksum: it must be the same file); ``mirror`` replaces
    every URL's directory; ``sha256`` replaces the one source's expected checksum (another version of it).
    """
    sha256 = check_sha256(sha256)
    if (url or sha256) and len(files) != 1:
        raise NeoxError(f"{'--url' if url else '--sha256'}: {name} has {len(files)} files; use --mirror for it")
    mirror = None if url else mirror or os.environ.get(MIRROR_ENV) or None
    trusted = recorded(out_dir)
    paths = []
    for src, rel in files:
        dest = os.path.join(out_dir, rel)
        expected, where = sha256 or src.sha256, "--sha256" if sha256 else "neox's pinned checksum"
        if expected is None and rel in trusted:
            expected, where = trusted[rel], f"recorded at its first download in {os.path.join(out_dir, TRUST_FILE)}"
        if force:
            for stale in (dest, dest + ".part"):
                if os.path.isfile(stale):
                    os.remove(stale)
        if os.path.isfile(dest) and expected is not None:
            _check_in_place(dest, expected.lower(), where)
        paths.append(download(url or source_url(src, mirror), dest, expected, progress, expected_from=where))
        if src.sha256 is not None:
            continue  # pinned in the registry: nothing to record
        digest = expected.lower() if expected is not None else sha256_of(dest)
        if trusted.get(rel) != digest:
            record = _record(out_dir, rel, digest)
            if expected is None:
                print(
                    f"warning: {rel} has no published checksum; trusted this first download as it came and "
                    f"recorded its sha256 {digest} in {record} (later downloads must match it; --sha256 pins another)",
                    file=sys.stderr,
                )
    return paths


def write_jsonl(out_path: str, docs) -> int:
    """Write ``{"text": ...}`` documents atomically; returns how many."""
    tmp = out_path + ".tmp"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False))
                f.write("\n")
                n += 1
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n
