"""The resumable sharding job: inputs of one split -> dense samples -> shards + records.

Workers (a process pool, results in input order) decode and convert each input once; the
main process assigns dense sample indices in input order and writes shards sequentially.
A shard is closed when the next ACCEPTED sample would exceed `per_shard` samples or the
size limit, so boundaries depend only on the inputs and options. Its input slice
[input_start, input_end) runs up to that next accepted input (the last shard: to the end),
which puts every rejection into exactly one shard record. The record `<stem>.json` is
written before the tar gets its final name, so a complete shard (tar + idx + json,
consistent) is a prefix a re-run can trust: it continues at the recorded input position and
dense index and produces byte-identical shards.
"""

import hashlib
import json
import multiprocessing
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from insclr.io import atomic_path, progress
from insclr.shard.images import (DEFAULT_MAX_PIXELS, JPEG_QUALITY, Rejected, convert_image, read_and_convert,
                                 read_input)
from insclr.shard.writer import ShardWriter, parse_index, sample_key, sha256_file

RECORD_FORMAT = "insclr-shard-record/1"
PREFIX = {"part": "part", "query": "query"}
MB = 1 << 20
TAR_BLOCK = 512
PROGRESS_EVERY = 32  # inputs per progress-bar update


@dataclass(frozen=True)
class Options:
    max_side: int = None
    shard_size_mb: float = 1024
    per_shard: int = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 1
    exif_transpose: bool = False  # rotate the pixels by their EXIF orientation (default: stored pixels)
    chunk: int = 64  # inputs per pool task (fewer when there are few inputs)
    min_pool_inputs: int = 64  # below this a pool costs more to start than it saves: convert inline

    def fingerprint_fields(self):
        # The worker count and chunking do not change the output, so a resume may use others.
        return {"max_side": self.max_side, "shard_size_mb": self.shard_size_mb, "per_shard": self.per_shard,
                "max_pixels": self.max_pixels, "jpeg_quality": JPEG_QUALITY, "exif_transpose": self.exif_transpose}


def fingerprint(dataset, split, items, options):
    """sha256 naming this split's exact inputs and options; every shard record carries it."""
    h = hashlib.sha256()
    h.update(json.dumps([dataset, split, options.fingerprint_fields()], sort_keys=True).encode())
    for item in items:
        h.update(json.dumps([str(item.path), item.id, item.label]).encode())
    return h.hexdigest()


def write_json_compact(path, obj):
    """Atomic one-line JSON (json.dumps' C encoder: manifests of a million samples stay fast)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj) + "\n")


# --------------------------------------------------------------------------- worker side

_WORKER_OPTIONS = {}


def _init_worker(max_side, max_pixels, exif_transpose=False):
    _WORKER_OPTIONS.update(max_side=max_side, max_pixels=max_pixels, exif_transpose=exif_transpose)


def _convert(path):
    """(jpeg, size, orig_size, input_bytes, None) or (None, None, None, 0, reason) for one input."""
    try:
        jpeg, size, orig_size, nbytes = read_and_convert(path, **_WORKER_OPTIONS)
        return jpeg, size, orig_size, nbytes, None
    except Rejected as e:
        return None, None, None, 0, str(e)


def _verdict(path):
    """_convert(path) in a pool worker, plus a checksum slot: (jpeg, size, orig_size, input_bytes, reason, crc).

    An input kept as it is (most of them) comes back without its bytes, as
    (None, size, orig_size, input_bytes, None, crc32 of the bytes): the main process reads the
    file again (from the page cache), which costs far less than sending the bytes through the
    pool's pipe. Converted images come back with their new bytes and crc None.
    """
    try:
        data = read_input(path)
        jpeg, size, orig_size = convert_image(data, **_WORKER_OPTIONS)
    except Rejected as e:
        return None, None, None, 0, str(e), None
    if jpeg is data:
        return None, size, orig_size, len(data), None, zlib.crc32(data)
    return jpeg, size, orig_size, len(data), None, None


def _resolve(path, verdict):
    """The _convert(path) result that a worker's _verdict stands for (main process)."""
    jpeg, size, orig_size, nbytes, reason, crc = verdict
    if crc is None:
        return jpeg, size, orig_size, nbytes, reason
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, nbytes + 1)  # one more: a file that grew is noticed
        finally:
            os.close(fd)
    except OSError:
        data = b""
    if len(data) == nbytes and zlib.crc32(data) == crc:
        return data, size, orig_size, nbytes, None  # exactly the bytes the worker validated
    return _convert(path)  # the file changed since the worker read it: validate what is there now


def convert_all(paths, options):
    """Yield _convert(path) for each path, in order, from `options.workers` processes.

    The caller (the main process) writes the shards while the workers decode, so even one
    worker overlaps decoding with writing. Workers get paths and send back a small verdict
    (the image bytes only when they were converted; see _verdict). Few inputs are converted
    inline (same results).
    """
    _init_worker(options.max_side, options.max_pixels, options.exif_transpose)
    if options.workers < 1 or len(paths) < options.min_pool_inputs:
        yield from map(_convert, paths)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # workers fork with Pillow and numpy already imported
    chunk = max(1, min(options.chunk, len(paths) // (4 * options.workers)))  # several chunks per worker
    with ctx.Pool(options.workers, initializer=_init_worker,
                  initargs=(options.max_side, options.max_pixels, options.exif_transpose)) as pool:
        verdicts = pool.imap(_verdict, [str(p) for p in paths], chunksize=chunk)
        for path, verdict in zip(paths, verdicts):
            yield _resolve(path, verdict)


# ----------------------------------------------------------------------- records / resume

def shard_stem(out, split, number):
    return Path(out) / f"{PREFIX[split]}-{number:06d}"


def remove_stray_files(out):
    """Delete temporary files a killed run left behind (ShardWriter's and atomic_path's)."""
    for p in Path(out).glob("*.tmp"):
        p.unlink()
    for p in Path(out).glob(".*.tmp"):
        p.unlink()


def _record_ok(stem, fp):
    """The record of shard `stem` if tar, idx and json are there and agree, else None."""
    tar, idx, rec = (stem.with_name(stem.name + ext) for ext in (".tar", ".idx", ".json"))
    if not (tar.is_file() and idx.is_file() and rec.is_file()):
        return None
    try:
        record = json.loads(rec.read_text())
        consistent = (record.get("format") == RECORD_FORMAT and record.get("fingerprint") == fp
                      and tar.stat().st_size == record["tar_bytes"] and idx.stat().st_size == record["idx_bytes"]
                      and sha256_file(idx) == record["idx_sha256"]  # small: a swapped or edited index is re-made
                      and len(parse_index(idx)) == record["count"])
    except (ValueError, KeyError, OSError):
        return None
    return record if consistent else None


def complete_prefix(out, split, fp):
    """Records of the complete shards 0, 1, ... of `split`; files of later/partial shards removed."""
    records, number = [], 0
    while True:
        stem = shard_stem(out, split, number)
        record = _record_ok(stem, fp)
        if record is None:
            break
        previous = records[-1] if records else {"input_end": 0, "first": 0, "count": 0}
        if (record.get("shard") != number or record["input_start"] != previous["input_end"]
                or record["first"] != previous["first"] + previous["count"]):
            break
        records.append(record)
        number += 1
    prefix = PREFIX[split]
    for p in Path(out).glob(f"{prefix}-*"):
        stem_number = p.name[len(prefix) + 1:].split(".")[0]
        if stem_number.isdigit() and int(stem_number) >= number:
            p.unlink()
    return records


def _foreign_records(out, split, fp):
    """Shard records in `out` for `split` written by a different run (other inputs or options)."""
    foreign = []
    for p in sorted(Path(out).glob(f"{PREFIX[split]}-*.json")):
        try:
            if json.loads(p.read_text()).get("fingerprint") != fp:
                foreign.append(p)
        except ValueError:
            continue  # unreadable: an incomplete record, removed by complete_prefix
    return foreign


# ----------------------------------------------------------------------------- the writer

def _meta(index, item, size, orig_size):
    """The per-sample `.json` member (docs/formats.md)."""
    return json.dumps({"index": index, "id": item.id, "label": item.label, "size": list(size),
                       "orig_size": list(orig_size)}).encode()


def _member_bytes(size):
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


@dataclass
class _OpenShard:
    number: int
    input_start: int
    first: int
    writer: ShardWriter
    tar_bytes: int = 2 * TAR_BLOCK  # the end-of-archive blocks
    columns: dict = field(default_factory=lambda: {"ids": [], "labels": [], "sizes": [], "orig_sizes": []})
    rejected: list = field(default_factory=list)

    @property
    def count(self):
        return len(self.columns["ids"])


class SplitBuilder:
    """Write the shards of one split of one dataset into `out`, resuming complete shards."""

    def __init__(self, out, dataset, split, items, options, src_root=None):
        self.out, self.dataset, self.split, self.items, self.options = Path(out), dataset, split, items, options
        self.src_root = Path(src_root) if src_root else None
        self.fp = fingerprint(dataset, split, items, options)
        self.limit = options.shard_size_mb * MB if options.shard_size_mb else None

    def source_name(self, item):
        if self.src_root is not None:
            try:
                return str(Path(item.path).relative_to(self.src_root))
            except ValueError:
                pass
        return str(item.path)

    def run(self):
        """Build (or finish) the split; returns (records, rejected_without_shard)."""
        foreign = _foreign_records(self.out, self.split, self.fp)
        if foreign:
            raise ValueError(f"{foreign[0]}: shards in {self.out} were made from other inputs or options; "
                             f"use a new --out folder or delete this one")
        records = complete_prefix(self.out, self.split, self.fp)
        start = records[-1]["input_end"] if records else 0
        first = records[-1]["first"] + records[-1]["count"] if records else 0
        if start >= len(self.items):
            return records, []
        return self._write(records, start, first)

    def _write(self, records, start, first):
        shard, pending, slice_start = None, [], start
        items = self.items[start:]
        bar = progress(total=len(items), desc=f"{self.dataset}/{self.split}", unit="img")
        t0, mbytes = time.perf_counter(), 0.0
        results = convert_all([i.path for i in items], self.options)
        try:
            for pos, item, (jpeg, size, orig_size, nbytes, reason) in zip(range(start, len(self.items)), items,
                                                                           results):
                mbytes += nbytes / MB
                if reason is not None:
                    entry = {"input": pos, "source": self.source_name(item), "id": item.id, "reason": reason}
                    (shard.rejected if shard else pending).append(entry)
                else:
                    meta = _meta(first, item, size, orig_size)
                    if shard is not None and self._full(shard, _member_bytes(len(jpeg)) + _member_bytes(len(meta))):
                        records.append(self._close(shard, input_end=pos))
                        shard, slice_start = None, pos
                    if shard is None:
                        stem = shard_stem(self.out, self.split, len(records))
                        shard = _OpenShard(len(records), slice_start, first, ShardWriter(stem).__enter__())
                        shard.rejected, pending = pending, []
                    self._add(shard, item, jpeg, meta, size, orig_size)
                    first += 1
                if (pos - start + 1) % PROGRESS_EVERY == 0:  # tqdm's update costs more than writing a sample
                    bar.set_postfix_str(f"{mbytes / max(time.perf_counter() - t0, 1e-9):.1f} MB/s", refresh=False)
                    bar.update(PROGRESS_EVERY)
            bar.update(len(items) % PROGRESS_EVERY)
            if shard is not None:
                records.append(self._close(shard, input_end=len(self.items)))
                shard = None
        except BaseException as e:
            if shard is not None:
                shard.writer.__exit__(type(e), e, None)  # removes the shard's .tmp files
            raise
        finally:
            results.close()
            bar.close()
        return records, pending

    def _full(self, shard, added):
        if self.options.per_shard and shard.count >= self.options.per_shard:
            return True
        return self.limit is not None and shard.tar_bytes + added > self.limit

    def _add(self, shard, item, jpeg, meta, size, orig_size):
        shard.writer.write(sample_key(shard.first + shard.count), {"jpg": jpeg, "json": meta})
        shard.tar_bytes += _member_bytes(len(jpeg)) + _member_bytes(len(meta))
        for key, value in (("ids", item.id), ("labels", item.label), ("sizes", list(size)),
                           ("orig_sizes", list(orig_size))):
            shard.columns[key].append(value)

    def _close(self, shard, input_end):
        """Finish the shard: record json first (from the .tmp files), then the renames."""
        stem = shard_stem(self.out, self.split, shard.number)
        record = {"format": RECORD_FORMAT, "fingerprint": self.fp, "dataset": self.dataset, "split": self.split,
                  "shard": shard.number, "tar": stem.name + ".tar", "idx": stem.name + ".idx",
                  "input_start": shard.input_start, "input_end": input_end, "first": shard.first,
                  "count": shard.count}

        def before_rename(tmp_tar, tmp_idx):
            record.update(sha256=shard.writer.sha256, idx_sha256=sha256_file(tmp_idx),
                          tar_bytes=os.path.getsize(tmp_tar), idx_bytes=os.path.getsize(tmp_idx),
                          rejected=shard.rejected, **shard.columns)
            write_json_compact(stem.with_name(stem.name + ".json"), record)

        shard.writer.before_rename = before_rename
        shard.writer.__exit__(None, None, None)
        return record
