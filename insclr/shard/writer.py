"""Deterministic WebDataset tar writer that also writes the DALI index of the tar.

A shard is written to `NAME.tar.tmp` / `NAME.idx.tmp` and both are renamed only once the
whole shard is complete, so a killed job never leaves a half shard under its final name.
Tar headers carry no time, user or host information: the same samples give the same bytes.
"""

import hashlib
import os
import tarfile
import threading
from pathlib import Path

from insclr.io import disk_full_error

DALI_INDEX_VERSION = "v1.2"  # the format that DALI's wds2idx writes and fn.readers.webdataset reads
KEY_DIGITS = 9
SYNC_EVERY = 64 << 20  # bytes written between background fdatasyncs
WRITE_BUFFER = 1 << 20  # few large writes: the tar's bytes cost one copy each, not a system call per member
_ZEROS = bytes(512)


def sample_key(index):
    """The WebDataset key of dataset sample `index` (zero-padded so keys sort as indices)."""
    return f"{index:0{KEY_DIGITS}d}"


def _tarinfo(name, size):
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def ustar_header(name, size):
    """The 512-byte USTAR header tarfile writes for `_tarinfo(name, size)`, built directly.

    Building it here rather than through TarFile.addfile (which copies the TarInfo and builds
    the header twice) keeps the tar writer well below the cost of decoding the image.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(_HEADER_TEMPLATE)
    header[0:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:155] = b"%06o\0" % sum(header)  # checksum over the header with its field as spaces
    return bytes(header)


def _template():
    info = _tarinfo("", 0)
    return bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")[:148] + b" " * 8
                     + info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")[156:])


_HEADER_TEMPLATE = _template()


class ShardWriter:
    """Write one tar shard and its DALI index.

    Usage::

        with ShardWriter("shards/x/part-000000") as w:
            w.write(sample_key(i), {"jpg": jpeg_bytes, "json": meta_bytes})

    Members of a sample are written in the order given; `write` records, per sample, the
    (extension, data offset, size, member name) entries that make a DALI index line. The tar
    bytes are those Python's tarfile writes in USTAR format (headers, 512-byte padding, two
    zero blocks and padding to a 10240-byte record at the end).
    """

    def __init__(self, stem, before_rename=None):
        self.stem = Path(stem)
        # Called as before_rename(tmp_tar, tmp_idx) once both are complete, before the renames
        # (the sharding job writes its per-shard record there, so a final tar implies its record).
        self.before_rename = before_rename
        self.tar_path = self.stem.with_name(self.stem.name + ".tar")
        self.idx_path = self.stem.with_name(self.stem.name + ".idx")
        self._tmp_tar = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._file = None
        self._sha256 = hashlib.sha256()  # of the tar bytes, as they are written
        self._index = []
        self._synced, self._syncer, self._sync_error = 0, None, None  # the background fdatasync
        self.offset = 0  # bytes written to the tar so far
        self.count = 0

    def __enter__(self):
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp_tar, "wb", buffering=WRITE_BUFFER)
        return self

    def write(self, key, members):
        """Append one sample: `members` maps extension (no dot) to bytes."""
        entries = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            entries.append((ext, self.offset + tarfile.BLOCKSIZE, len(data), name))
            padding = -len(data) % tarfile.BLOCKSIZE
            for block in (ustar_header(name, len(data)), data, _ZEROS[:padding]):
                self._file.write(block)
                self._sha256.update(block)
            self.offset += tarfile.BLOCKSIZE + len(data) + padding
        self._index.append(entries)
        self.count += 1
        if self.offset - self._synced >= SYNC_EVERY and (self._syncer is None or not self._syncer.is_alive()):
            self._join_sync()  # the previous one is done (raises its error, if any)
            self._start_sync()

    def _start_sync(self):
        """fdatasync what is written so far in a thread, so that the fsync at the end has little left to do."""
        self._file.flush()
        self._synced = self.offset

        def sync(fd):
            try:
                os.fdatasync(fd)
            except OSError as e:  # raised again by _join_sync: a write-back error is reported only once
                self._sync_error = e

        self._syncer = threading.Thread(target=sync, args=(self._file.fileno(),), daemon=True)
        self._syncer.start()

    def _join_sync(self):
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._sync_error is not None:
            error, self._sync_error = self._sync_error, None
            raise error

    def __exit__(self, exc_type, exc, tb):
        """Finish the shard (no error) or discard its temporary files (an error, or one while finishing).

        A write that ran out of room, in the block or here, is raised as a DiskFull naming the tar.
        Safe to call again: a finished or discarded writer does nothing.
        """
        if self._file is None:
            return False
        if exc_type is None:
            try:
                self._finish()
            except BaseException as e:
                self._discard(e)
                raise
            return False
        self._discard(exc)
        return False

    def _finish(self):
        end = self.offset + 2 * tarfile.BLOCKSIZE
        tail = bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE))
        self._file.write(tail)
        self._sha256.update(tail)
        self._file.flush()
        self._join_sync()
        os.fsync(self._file.fileno())
        self._file.close()
        with open(self._tmp_idx, "w") as f:
            f.write(format_index(self._index))
        if self.before_rename is not None:
            self.before_rename(self._tmp_tar, self._tmp_idx)
        # The tar is renamed last: a complete tar under its final name implies its index is there.
        os.replace(self._tmp_idx, self.idx_path)
        os.replace(self._tmp_tar, self.tar_path)
        self._file = None

    def _discard(self, error):
        """Close the tar and delete both temporary files after `error`; a write that ran out of
        room is raised again as a DiskFull naming the tar."""
        try:
            self._join_sync()
        except OSError:
            pass  # the error that brought us here is the one to report
        try:
            self._file.close()
        except OSError:
            pass  # flushing the rest of the buffer fails the same way on a full disk
        self._file = None
        full = disk_full_error(error, self.tar_path, partial=self._tmp_tar) if isinstance(error, Exception) else None
        for p in (self._tmp_tar, self._tmp_idx):
            p.unlink(missing_ok=True)
        if full is not None and full is not error:
            raise full from error

    @property
    def sha256(self):
        """Hex sha256 of the tar bytes written so far (the whole tar once the writer has exited)."""
        return self._sha256.hexdigest()


def format_index(samples):
    """DALI index text for `samples`: a list of [(ext, offset, size, name), ...] per sample."""
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    for entries in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in entries))
    return "\n".join(lines) + "\n"


def parse_index(path):
    """Read a DALI index file into a list of {ext: (offset, size, name)} dicts, one per sample.

    Raises ValueError naming the file on any malformed line.
    """
    path = Path(path)
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty DALI index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"{path}: bad header {lines[0]!r}, expected '{DALI_INDEX_VERSION} <count>'")
    count = int(head[1])
    if len(lines) - 1 != count:
        raise ValueError(f"{path}: header says {count} samples, file has {len(lines) - 1} lines")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ValueError(f"{path}:{lineno}: expected groups of 'ext offset size name'")
        sample = {}
        for j in range(0, len(parts), 4):
            ext, off, size, name = parts[j:j + 4]
            if not (off.isdigit() and size.isdigit()):
                raise ValueError(f"{path}:{lineno}: offset/size not integers in {line!r}")
            sample[ext] = (int(off), int(size), name)
        samples.append(sample)
    return samples


def sha256_file(path, chunk=1 << 22):
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
