"""Small file helpers shared by every stage: atomic writes, output locks, JSON lines, progress bars."""

import errno
import json
import os
import secrets
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# What a write that ran out of room fails with, and how to say it.
NO_SPACE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file size limit exceeded"}


class DiskFull(OSError):
    """A write that found no room (ENOSPC, EDQUOT, EFBIG); the message names the file."""

    def __str__(self):
        return self.strerror


def disk_full_error(error, path, partial=None):
    """A DiskFull naming `path` when `error` is a write that ran out of room; else None.

    The errno is looked for along the chain (torch.save raises a RuntimeError over the OSError);
    where the writer dropped it (numpy's tofile, torch's C++ file writer), a write to the
    `partial` file it left asks the kernel why.
    """
    cause, seen, io_failure = error, set(), False
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DiskFull):
            return cause
        if isinstance(cause, OSError) and cause.errno is not None:
            break
        io_failure |= isinstance(cause, (OSError, RuntimeError))  # what those writers raise instead
        cause = cause.__cause__ or cause.__context__
    number = cause.errno if isinstance(cause, OSError) else None
    if number is None and io_failure and partial is not None:
        number = _write_errno(partial)
    if number not in NO_SPACE:
        return None
    return DiskFull(number, f"{NO_SPACE[number]}: cannot write {path} ({os.strerror(number)}); nothing "
                            f"was replaced, free some space and run again", str(path))


def _write_errno(path, probe=64 << 10):
    """The errno with which appending `probe` bytes to `path` fails, or None if it does not fail.

    After a write that ran out of room, less than a block is free: a small probe is enough.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return None
    try:
        written = 0
        while written < probe:  # a short write is the kernel filling the last free block: ask again
            count = os.write(fd, bytes(probe - written))
            if count == 0:
                return None
            written += count
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
    return None


@contextmanager
def reporting_disk_full(path):
    """Turn a write error of the block that ran out of room into a DiskFull naming `path`."""
    try:
        yield
    except Exception as e:
        full = disk_full_error(e, path)
        if full is None or full is e:
            raise
        raise full from e


def _new_temp(path):
    """Create an empty temporary file beside `path` and return its path.

    Created with mode 0o666 so that the umask decides the final file's permissions, as for any
    file opened for writing (tempfile.mkstemp would make every output 0600).
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash inside the block leaves any previous `path` untouched and removes the partial file;
    a write that runs out of room raises DiskFull naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with reporting_disk_full(path):
        tmp = _new_temp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full_error(e, path, partial=tmp) if isinstance(e, Exception) else None
        tmp.unlink(missing_ok=True)
        if full is not None and full is not e:
            raise full from e
        raise


def save_torch(obj, path):
    """torch.save to `path` atomically. Through a Python file, which is closed as soon as a write
    fails: torch's own file writer would keep a failed file (and its disk space) until garbage
    collection, and report a full disk without its errno."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


class OutputLocked(ValueError):
    """An output that another live process is writing."""


def _lock_holder(fd):
    """'PID on HOST' as the holder wrote it (it writes just after locking: give it a moment)."""
    for _ in range(20):
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.01)
    return "unknown"


@contextmanager
def output_lock(path):
    """Hold an exclusive lock on output `path` (a file or a folder) for the block; a second writer
    gets OutputLocked naming `path` and the holder's pid.

    The lock is an flock(2) on `.NAME.lock` beside the output, outside it so that the output's
    own files stay as they are; the kernel releases it when its holder dies, even by SIGKILL, so
    a killed run never blocks the next one. Under torchrun only the job's rank 0 takes it (the
    other ranks write under rank 0's direction); a restarted job's new rank 0 takes it again once
    torchrun has stopped the old workers.
    """
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = Path(path).resolve()  # one lock whatever the spelling (relative, through a symlink)
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(f"{path} is being written by another process (pid {_lock_holder(fd)}); "
                               f"wait for it to finish or stop it, then run again") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            print(f"warning: {lock}: the file system offers no locks; nothing stops a second writer of "
                  f"{path}", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting writer)


def write_json(path, obj, indent=1):
    """Write `obj` as JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")


def read_json(path, what="JSON file"):
    """Read JSON, turning a missing or malformed file into an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed {what}: {e}") from None


def save_npy(path, array):
    """np.save to `path` atomically (np.save would otherwise append '.npy' to the temp name)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_npz(path, **arrays):
    """np.savez to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


class JsonLines:
    """Append-only JSON-lines metrics file; each record written is flushed to the file at once (the
    training loop writes its records every train.log_every steps, insclr.train.metrics)."""

    def __init__(self, path, truncate=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w" if truncate else "a")

    def write(self, record):
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


PROGRESS_INTERVAL = 10.0  # seconds between the lines a bar prints off a terminal


class _BarLines:
    """tqdm's output for a log file (stderr not a terminal): each refresh becomes one line,
    without the carriage returns that would pile thousands of updates into a log."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").replace("\x1b[A", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, total=None, desc=None, unit="img", disable=None, **kw):
    """A tqdm bar on stderr; disabled automatically off rank 0 (set by the caller) or when asked.

    On a terminal it redraws in place; in a log (a pipeline stage, a batch job, a piped `make
    demo`) it prints one line every INSCLR_PROGRESS_INTERVAL seconds (default 10)."""
    from tqdm import tqdm

    if disable is None:
        disable = os.environ.get("INSCLR_NO_PROGRESS") == "1"
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                    file=sys.stderr, disable=disable, **kw)
    interval = float(os.environ.get("INSCLR_PROGRESS_INTERVAL", PROGRESS_INTERVAL))
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, ncols=100,
                file=_BarLines(sys.stderr), disable=disable, mininterval=interval, maxinterval=interval, **kw)


def print_table(rows, columns, title=None):
    """Print `rows` (list of dicts) as an aligned text table with the given column order."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


_PACKAGE = Path(__file__).resolve().parent


def print_error(error):
    """A command's one-line `error: ...` for bad input (the message names the file, key or value).

    Our own checks raise these with a full explanation, so they print no traceback; an error
    raised outside insclr (a library failing inside our code: more likely a bug than bad input)
    prints its traceback first, as does any error with INSCLR_TRACEBACK=1 in the environment.
    """
    import traceback

    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_by_us = tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)
    if not raised_by_us or os.environ.get("INSCLR_TRACEBACK") == "1":
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {error}", file=sys.stderr)
