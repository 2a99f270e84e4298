"""Downloads for `neox prepare`: resumable, mirrorable, checksum-verified; and the JSONL files made from them.

Bytes go to ``FILE.part`` and a rerun asks the server for the rest with an HTTP Range request. ``mirror`` (or
``NEOX_CORPUS_MIRROR``) replaces every URL's directory, so air-gapped sites and tests can serve the same file
names locally. A download whose sha256 does not match is deleted, so no partial or wrong file is left.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from neox.errors import DataError, NeoxError

MIRROR_ENV = "NEOX_CORPUS_MIRROR"


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
    url: str, dest: str, sha256: str | None = None, progress: bool | None = None, timeout: float = 60.0
) -> str:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a partial file; verify ``sha256``.

    A finished ``dest`` is not fetched again. A server that ignores the Range request makes the download
    start over. On a checksum mismatch the bad bytes are deleted and a DataError says so.
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
            return _finish(part, dest, url, sha256)
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
    return _finish(part, dest, url, sha256)


def _finish(part: str, dest: str, url: str, sha256: str | None) -> str:
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256.lower():
        os.remove(part)
        raise DataError(
            f"{url}: sha256 {digest} does not match the expected {sha256}; the download was deleted. "
            f"Run again, or use --mirror/--url pointing at a correct copy"
        )
    if sha256 is None:
        print(f"{os.path.basename(dest)}: sha256 {digest} (no published checksum to verify against)", file=sys.stderr)
    os.replace(part, dest)
    return dest


def fetch(name: str, files: list, out_dir: str, mirror, url, force: bool, progress) -> list[str]:
    """Download each (Source, path under out_dir); returns the local paths. ``url`` replaces the one source's
    URL (keeping its checksum: it must be the same file); ``mirror`` replaces every URL's directory."""
    if url:
        if len(files) != 1:
            raise NeoxError(f"--url: {name} has {len(files)} files; use --mirror for it")
        files = [(Source(url, files[0][0].sha256), files[0][1])]
    mirror = None if url else mirror or os.environ.get(MIRROR_ENV) or None
    paths = []
    for src, rel in files:
        dest = os.path.join(out_dir, rel)
        if force:
            for stale in (dest, dest + ".part"):
                if os.path.isfile(stale):
                    os.remove(stale)
        paths.append(download(source_url(src, mirror), dest, src.sha256, progress))
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
