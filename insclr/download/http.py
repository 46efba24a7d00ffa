"""Resumable HTTP downloads with the standard library only (urllib).

A download goes to `DEST.part`; each attempt asks for the missing tail with an HTTP Range
request, so a dropped connection costs only what was in flight. When the bytes are all there
the file is checked (size, then md5/sha256 when known) and only then renamed to DEST, so an
existing DEST is always a complete, verified file. A checksum mismatch deletes the `.part`
file and raises: a corrupted download is never kept as complete.
"""

import hashlib
import http.client
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from insclr.io import progress

USER_AGENT = "insclr-download/0.1"


class DownloadError(RuntimeError):
    """A download that failed for good (HTTP 4xx, retries exhausted)."""


class ChecksumError(DownloadError):
    """A completed download whose size or checksum does not match what was expected."""


def file_digest(path, algo="md5", chunk=1 << 20):
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _total_from(response, offset):
    """Full size of the remote file from a 200/206 response, or None when the server hides it."""
    content_range = response.headers.get("Content-Range")
    if content_range:
        m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", content_range)
        if m and m.group(3) != "*":
            return int(m.group(3))
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        return int(length) + (offset if response.status == 206 else 0)
    return None


def _attempt(url, part, timeout, chunk, bar):
    """One request for the missing tail of `part`; returns the total size (or None if unknown).

    Raises on a network error or a short read; the bytes received so far stay in `part`.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Range past the end: the .part is already whole (or larger than the file: restart).
            total = _total_from_416(e)
            if total == offset:
                return total
            part.unlink()
            raise ConnectionError(f"{url}: stale partial file of {offset} bytes discarded") from None
        raise
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header: start over
        total = _total_from(response, offset)
        bar.reset(total=total)
        bar.update(offset)
        with open(part, "ab" if offset else "wb") as f:
            received = offset
            while True:
                block = response.read(chunk)
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received < total:
        raise ConnectionError(f"{url}: connection closed after {received} of {total} bytes")
    return total if total is not None else received


def _total_from_416(error):
    m = re.match(r"bytes\s+\*/(\d+)", error.headers.get("Content-Range", "") or "")
    return int(m.group(1)) if m else None


def _retryable(error):
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    return isinstance(error, (urllib.error.URLError, ConnectionError, http.client.HTTPException,
                              socket.timeout, TimeoutError, OSError))


def _verify(part, url, size=None, md5=None, sha256=None):
    """Raise ChecksumError (after deleting `part`) when size or digest disagree."""
    problems = []
    got_size = part.stat().st_size
    if size is not None and got_size != size:
        problems.append(f"size {got_size} bytes, expected {size}")
    for algo, expected in (("md5", md5), ("sha256", sha256)):
        if expected and not problems:
            got = file_digest(part, algo)
            if got.lower() != expected.lower():
                problems.append(f"{algo} {got}, expected {expected}")
    if problems:
        part.unlink()
        raise ChecksumError(f"{url}: downloaded file is corrupt ({'; '.join(problems)}); "
                            f"the partial file {part} was deleted, run the command again to retry")


def fetch(url, dest, *, size=None, md5=None, sha256=None, retries=5, backoff=1.0, timeout=60.0,
          chunk=1 << 20, desc=None):
    """Download `url` to `dest` (resuming `dest.part`), verify it, rename it into place.

    size / md5 / sha256: expected values when known (checked once all bytes are there).
    retries: consecutive failed attempts allowed; an attempt that received bytes resets the
    count, so a large file survives many drops. Waits backoff·2^(n-1) s before retry n.
    Returns (dest, seconds_spent, bytes_total). An existing `dest` is taken as complete.
    """
    dest = Path(dest)
    if dest.exists():
        return dest, 0.0, dest.stat().st_size
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start, failures = time.time(), 0
    with progress(total=None, desc=desc or dest.name, unit="B", unit_divisor=1024) as bar:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _attempt(url, part, timeout, chunk, bar)
                break
            except Exception as e:  # noqa: BLE001 - classified just below
                if not _retryable(e):
                    code = getattr(e, "code", None)
                    raise DownloadError(f"{url}: {'HTTP ' + str(code) if code else type(e).__name__}: "
                                        f"{getattr(e, 'reason', e)}") from None
                now = part.stat().st_size if part.exists() else 0
                failures = 1 if now > before else failures + 1
                if failures > retries:
                    raise DownloadError(f"{url}: giving up after {retries} retries: {e} "
                                        f"({now} bytes kept in {part}; run again to resume)") from None
                time.sleep(backoff * 2 ** (failures - 1))
    _verify(part, url, size=size, md5=md5, sha256=sha256)
    part.replace(dest)
    return dest, time.time() - start, dest.stat().st_size
