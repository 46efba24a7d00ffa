"""Small file helpers shared by every stage: atomic writes, JSON lines, progress bars."""

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash inside the block leaves any previous `path` untouched and removes the partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    """Append-only JSON-lines metrics file; each record is flushed so a crash loses at most one."""

    def __init__(self, path, truncate=False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w" if truncate else "a")

    def write(self, record):
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


def progress(iterable=None, total=None, desc=None, unit="img", disable=None, **kw):
    """A tqdm bar on stderr; disabled automatically off rank 0 (set by the caller) or when asked."""
    from tqdm import tqdm

    if disable is None:
        disable = os.environ.get("INSCLR_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                file=sys.stderr, disable=disable, **kw)


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
