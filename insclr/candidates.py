"""The candidate pool as training reads it: one `CandidatePool`, memory-mapped from pool.npz.

`python -m insclr.pool` writes pool.npz with np.savez: a zip archive whose members are stored
uncompressed .npy files (neighbors int32 [N, k], similarities float32 [N, k] by default or
float16 with --dtype float16, and the shard identity strings). Because the members are stored, each array is a contiguous run of bytes in
the file, so `CandidatePool.open` maps it with np.memmap instead of reading it: the pages come
from the operating system's page cache, which every rank of a node shares. At GLDv2 scale
(1.2M x 500) the arrays are 4.8 GB on disk (3.6 GB with float16 similarities) and cost each
rank no private memory; the earlier
loader read them and widened them to int64/float32, 7.2 GB per rank (docs/training.md,
`python -m insclr.bench pool-memory`).

The arrays are mapped copy-on-write (mmap mode 'c'): tensors made from them with
torch.from_numpy are writable, and a write (nothing in insclr writes) would stay private to
the process instead of changing the file.
"""

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

CHECK_ROWS = 1 << 16  # rows scanned at a time by the checks of `open`
MEMBERS = ("neighbors", "similarities")
SIMILARITY_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_LOCAL_HEADER = 30    # bytes of a zip local file header before the name and the extra field


@dataclass(frozen=True, eq=False)
class CandidatePool:
    """The k nearest neighbours of every training image, best first (ALGORITHM §3).

    neighbors: int32 [N, k] dataset indices (never the row itself); similarities: float32 or
    float16 [N, k] descending (as stored); identity: the shard identity the pool was made from (None: not recorded);
    path: the file it was mapped from (None: in memory). Both arrays are read-only in spirit:
    a memory map of the file, shared by the ranks of a node.
    """

    neighbors: np.ndarray
    similarities: np.ndarray
    identity: Optional[str] = None
    path: Optional[Path] = None

    def __post_init__(self):
        where = self.path or "candidate pool"
        if self.neighbors.dtype != np.int32 or self.similarities.dtype not in SIMILARITY_DTYPES:
            raise ValueError(f"{where}: neighbors {self.neighbors.dtype} / similarities {self.similarities.dtype}; "
                             f"a candidate pool holds int32 / float32 or float16 (remake it with python -m insclr.pool)")
        if self.neighbors.ndim != 2 or self.neighbors.shape != self.similarities.shape:
            raise ValueError(f"{where}: neighbors {self.neighbors.shape} and similarities "
                             f"{self.similarities.shape} must be two [N, k] arrays")

    @property
    def num_samples(self):
        return self.neighbors.shape[0]

    @property
    def k(self):
        return self.neighbors.shape[1]

    @classmethod
    def from_arrays(cls, neighbors, similarities, identity=None):
        """An in-memory pool (tests, benchmarks) from any integer / float arrays or tensors: int32
        neighbours (indices must fit, which any N of this project does), float16 similarities kept,
        any other float as float32."""
        neighbors, similarities = np.asarray(neighbors), np.asarray(similarities)
        if neighbors.size and (neighbors.min() < np.iinfo(np.int32).min or neighbors.max() > np.iinfo(np.int32).max):
            raise ValueError("candidate pool: neighbour indices do not fit in int32")
        sims_dtype = np.float16 if similarities.dtype == np.float16 else np.float32
        return cls(np.ascontiguousarray(neighbors, dtype=np.int32),
                   np.ascontiguousarray(similarities, dtype=sims_dtype), identity)

    @classmethod
    def open(cls, path, manifest=None):
        """Map pool.npz; refuse it when unreadable, compressed, with NaN similarities, with a row
        listing itself, or (given the shard folder's `manifest`) made from another shard folder."""
        from insclr.pool import check_source

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: candidate pool not found (make it with `python -m insclr.pool`)")
        neighbors, similarities, source = _map_npz(path)
        pool = cls(neighbors, similarities, source.get("shards_identity"), path)
        pool.check_values()
        if manifest is not None:
            check_source("candidate pool", path, source, manifest)
        return pool

    def check_values(self):
        """Raise ValueError naming the first row with a NaN/infinite similarity or listing itself."""
        where = self.path or "candidate pool"
        for start in range(0, self.num_samples, CHECK_ROWS):  # in blocks: a million rows, mapped
            stop = min(start + CHECK_ROWS, self.num_samples)
            bad = ~np.isfinite(self.similarities[start:stop]).all(axis=1)
            if bad.any():
                raise ValueError(f"{where}: row {start + int(np.argmax(bad))} has NaN or infinite similarities; "
                                 f"remake the pool (python -m insclr.pool) from finite features")
            own = (self.neighbors[start:stop] == np.arange(start, stop, dtype=np.int32)[:, None]).any(axis=1)
            if own.any():
                raise ValueError(f"{where}: row {start + int(np.argmax(own))} lists itself as a neighbour; a "
                                 f"candidate pool never does (python -m insclr.pool)")

    def check_for_training(self, num_samples, k):
        """Raise ValueError unless the pool has `num_samples` rows, at least `k` columns and indices
        in [0, num_samples) (`num_samples`: the training images of data.shards; `k`: data.k)."""
        where = self.path or "candidate pool"
        if self.num_samples != num_samples:
            raise ValueError(f"{where}: pool of shape {self.neighbors.shape}/{self.similarities.shape} does not "
                             f"match the {num_samples} training images of data.shards")
        if self.k < k:
            raise ValueError(f"{where}: pool has {self.k} neighbours per image, data.k={k} needs more")
        lo, hi = self.index_range()
        if self.neighbors.size and (lo < 0 or hi >= num_samples):
            raise ValueError(f"{where}: neighbour indices span [{lo}, {hi}], outside the "
                             f"{num_samples} training images of data.shards")

    def index_range(self):
        """(smallest, largest) neighbour index, scanned in blocks."""
        lo, hi = np.iinfo(np.int32).max, np.iinfo(np.int32).min
        for start in range(0, self.num_samples, CHECK_ROWS):
            block = self.neighbors[start:start + CHECK_ROWS]
            if block.size:
                lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
        return lo, hi


def _map_npz(path):
    """(neighbors, similarities, source {shards, shards_identity, split}) of an .npz, the two
    arrays as memory maps of their stored members."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {info.filename[:-4]: info for info in z.infolist() if info.filename.endswith(".npy")}
            missing = set(MEMBERS) - set(names)
            if missing:
                raise ValueError(f"{path}: not a candidate pool, missing arrays {sorted(missing)}")
            source = {}
            for key in ("shards", "shards_identity", "split"):
                if key in names:
                    with z.open(names[key]) as f:
                        source[key] = str(np.lib.format.read_array(f, allow_pickle=False))
        arrays = [_map_member(path, names[name]) for name in MEMBERS]
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: not a readable candidate pool (.npz from python -m insclr.pool): {e}") from None
    return arrays[0], arrays[1], source


def _map_member(path, info):
    """np.memmap (mode 'c') of the stored .npy member `info` of zip file `path`."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: {info.filename} is compressed (np.savez_compressed?); training maps the "
                         f"pool from the file and needs it stored: remake it with python -m insclr.pool")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(_LOCAL_HEADER)
        if len(header) != _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: bad zip header of {info.filename}")
        name_len = int.from_bytes(header[26:28], "little")
        extra_len = int.from_bytes(header[28:30], "little")
        f.seek(info.header_offset + _LOCAL_HEADER + name_len + extra_len)
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {info.filename} holds Python objects, not numbers")
    if offset + int(np.prod(shape)) * dtype.itemsize > path.stat().st_size:
        raise ValueError(f"{path}: {info.filename} is truncated")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="c", shape=shape, offset=offset, order="F" if fortran else "C")
