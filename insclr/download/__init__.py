"""`python -m insclr.download NAME... --root datasets/`: fetch the real datasets in their original layouts.

Downloads resume (HTTP Range into `FILE.part`), retry with exponential back-off, are checked
(GLDv2 against its md5 lists; every other file against its server-announced size, and its
sha256 is recorded in ROOT/.downloads/checksums.json and checked on later runs), and archives
are extracted safely (no member may leave the dataset folder). An archive whose content turns
out damaged (it does not extract, or no longer matches its recorded sha256) is moved aside to
`<file>.corrupt` and fetched once more. A finished archive leaves a marker
`ROOT/.downloads/<file>.extracted`, so a rerun skips it, and is then deleted unless
--keep-archives. Nothing here runs at import time.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

from insclr.download.archive import CorruptArchiveError, archive_kind, extract
from insclr.download.catalog import BASE_URLS, DATASETS, items_for, parse_md5_list
from insclr.download.http import ChecksumError, DownloadError, fetch, file_digest
from insclr.io import print_error, write_json

__all__ = ["download", "fetch", "extract", "DATASETS", "BASE_URLS", "main",
           "DownloadError", "ChecksumError"]


def _url(bases, item, path=None):
    return bases[item.base].rstrip("/") + "/" + (path or item.path)


class _Checksums:
    """sha256 of each finished plain download, kept in ROOT/.downloads/checksums.json."""

    def __init__(self, path):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def check_or_record(self, file, key):
        digest = file_digest(file, "sha256")
        known = self.data.get(key)
        if known is not None and known != digest:
            raise ChecksumError(f"{file}: sha256 {digest} differs from the one recorded when it was "
                                f"downloaded ({known}, in {self.path}); delete the file to fetch it again")
        self.data[key] = digest
        write_json(self.path, self.data)

    def forget(self, key):
        if self.data.pop(key, None) is not None:
            write_json(self.path, self.data)


def _md5_for(item, bases, state_dir, opts):
    """Expected md5 of `item` from its md5 list (fetched into the state folder)."""
    if not item.md5_path:
        return None
    listing = state_dir / item.md5_path.replace("/", "__")
    fetch(_url(bases, item, item.md5_path), listing, retries=opts["retries"], timeout=opts["timeout"],
          backoff=opts["backoff"])
    sums = parse_md5_list(listing.read_text(), listing)
    if item.name not in sums:
        raise ChecksumError(f"{listing}: no md5 for {item.name}")
    return sums[item.name]


def _flatten(folder, suffix):
    """Move every file ending in `suffix` below `folder` up into `folder` (Paris: paris/<landmark>/)."""
    folder = Path(folder)
    for path in sorted(folder.rglob(f"*{suffix}")):
        if path.parent != folder and path.is_file():
            os.replace(path, folder / path.name)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(sub.iterdir()):
            sub.rmdir()


def _unpack(archive, item, target):
    """Extract `archive` into `target` honouring the item's pick/flatten options."""
    if item.pick:
        scratch = target / f".pick-{item.name}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            extract(archive, scratch)
            for name in item.pick:
                found = sorted(scratch.rglob(name))
                if not found:
                    raise FileNotFoundError(f"{archive}: holds no member named {name}")
                os.replace(found[0], target / name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    extract(archive, target)
    if item.flatten:
        _flatten(target, item.flatten)


def fetch_item(item, folder, bases, state_dir, checksums, opts):
    """Download (and unpack) one item; returns (bytes, seconds, status)."""
    target = folder / item.to
    url = _url(bases, item)
    if not item.extract:
        if target.exists():
            checksums.check_or_record(target, url) if opts["verify"] else None
            return target.stat().st_size, 0.0, "present"
        _, secs, size = fetch(url, target, md5=_md5_for(item, bases, state_dir, opts), **_net(opts))
        checksums.check_or_record(target, url)
        return size, secs, "downloaded"
    marker = state_dir / f"{item.base}__{item.path.replace('/', '__')}.extracted"
    if marker.exists():
        return json.loads(marker.read_text())["bytes"], 0.0, "present"
    if archive_kind(item.name) is None:
        raise ValueError(f"{item.name}: marked as an archive but has no archive suffix")
    size, secs = fetch_archive(item, url, target, state_dir / "archives" / item.name,
                               lambda: _md5_for(item, bases, state_dir, opts), checksums, opts)
    write_json(marker, {"url": url, "bytes": size, "extracted_to": str(target)})
    return size, secs, "downloaded"


def fetch_archive(item, url, target, archive, md5, checksums, opts):
    """Download `archive` (unless it is there) and unpack it into `target`; returns (bytes, seconds).

    A copy that turns out damaged (it does not extract, or its sha256 is not the one recorded when
    it was downloaded) is moved aside to ARCHIVE.corrupt and fetched once more: a file of the right
    size can still hold the wrong bytes. md5: a function giving the expected md5 (or None).
    """
    start = time.time()
    for attempt in (1, 2):
        _, _, size = fetch(url, archive, md5=md5(), **_net(opts))
        try:
            if not item.md5_path:
                checksums.check_or_record(archive, url)
            _make_folder(target, "dataset folder")
            _unpack(archive, item, target)
            break
        except (CorruptArchiveError, ChecksumError) as e:
            aside = archive.with_name(archive.name + ".corrupt")
            os.replace(archive, aside)
            checksums.forget(url)
            if attempt == 2:
                raise DownloadError(f"{e}: fetched again and still damaged; the copy is kept as {aside}") from None
            print(f"warning: {e}; moved to {aside}, downloading it again", file=sys.stderr)
    archive.with_name(archive.name + ".corrupt").unlink(missing_ok=True)  # replaced by a good copy
    if not opts["keep_archives"]:
        archive.unlink()
    return size, time.time() - start


def _make_folder(path, what):
    """mkdir -p `path`, with an error naming it when a file stands in the way."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what} {path}: a file is in the way (it, or a folder above it, is a file)") from None


def _net(opts):
    return {"retries": opts["retries"], "timeout": opts["timeout"], "backoff": opts["backoff"]}


def download(names, root, parts=None, base_urls=None, retries=5, timeout=60.0, backoff=2.0,
             keep_archives=False, verify=False):
    """Fetch datasets `names` under `root`; returns a list of per-file rows for the summary."""
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}")
    bases = dict(BASE_URLS, **(base_urls or {}))
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--root {root}: is a file, not a folder")
    state_dir = root / ".downloads"
    _make_folder(state_dir, "--root")
    checksums = _Checksums(state_dir / "checksums.json")
    opts = {"retries": retries, "timeout": timeout, "backoff": backoff, "keep_archives": keep_archives,
            "verify": verify}
    rows = []
    for name in names:
        dataset = DATASETS[name]
        folder = root / dataset.folder
        _make_folder(folder, "dataset folder")
        for item in items_for(dataset, parts if dataset.part is not None else None):
            size, secs, status = fetch_item(item, folder, bases, state_dir, checksums, opts)
            rows.append({"dataset": name, "file": item.name, "bytes": size, "seconds": round(secs, 2),
                         "status": status})
    return rows


def _parse_base_urls(pairs):
    out = {}
    for pair in pairs or ():
        key, sep, url = pair.partition("=")
        if not sep or key not in BASE_URLS:
            raise SystemExit(f"--base-url {pair!r}: expected KEY=URL with KEY one of {sorted(BASE_URLS)}")
        out[key] = url
    return out


def _plan(names, parts, bases):
    for name in names:
        dataset = DATASETS[name]
        print(f"{name}: {dataset.about}  -> {dataset.folder}/")
        for item in items_for(dataset, parts if dataset.part is not None else None):
            print(f"  {_url(bases, item)}  -> {dataset.folder}/{item.to}{' (extract)' if item.extract else ''}")


def main(argv=None):
    from insclr.args import Parser, nonnegative_float, nonnegative_int, positive_float

    p = Parser(prog="python -m insclr.download", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", metavar="NAME", help=f"datasets: {', '.join(DATASETS)}")
    p.add_argument("--root", default="datasets", help="where the dataset folders go (default datasets/)")
    p.add_argument("--parts", help="subset of the multi-part sets, e.g. 0-9 or 0,5,7-9")
    p.add_argument("--base-url", action="append", metavar="KEY=URL",
                   help=f"replace a base address ({', '.join(BASE_URLS)})")
    p.add_argument("--retries", type=nonnegative_int, default=5, help="consecutive failures allowed per file")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds without data before retrying")
    p.add_argument("--backoff", type=nonnegative_float, default=2.0, help="first retry wait in s (doubles each time)")
    p.add_argument("--keep-archives", action="store_true", help="keep archives after extracting them")
    p.add_argument("--verify", action="store_true", help="recheck the sha256 of files already present")
    p.add_argument("--dry-run", action="store_true", help="print the addresses and targets, fetch nothing")
    args = p.parse_args(argv)
    bases = dict(BASE_URLS, **_parse_base_urls(args.base_url))
    try:
        if args.dry_run:
            unknown = [n for n in args.names if n not in DATASETS]
            if unknown:
                raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}")
            _plan(args.names, args.parts, bases)
            return 0
        rows = download(args.names, args.root, parts=args.parts, base_urls=bases, retries=args.retries,
                        timeout=args.timeout, backoff=args.backoff, keep_archives=args.keep_archives,
                        verify=args.verify)
    except (ValueError, DownloadError, RuntimeError, OSError) as e:
        print_error(e)
        return 1
    total = sum(r["bytes"] for r in rows)
    fresh = sum(r["status"] == "downloaded" for r in rows)
    print(f"{len(rows)} files ({fresh} fetched now, {len(rows) - fresh} already present), "
          f"{total / 2**30:.2f} GiB under {args.root}")
    return 0
