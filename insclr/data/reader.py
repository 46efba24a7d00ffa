"""Random access to the JPEG bytes of a shard set, by sample index.

Each shard's DALI index is parsed once; each tar is opened once; bytes are read with
positional reads (os.pread: no shared file position, so the threads of the pool need no lock)
and can be requested ahead of use so that the disk is never what the decoder waits for.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from insclr.shard.manifest import Manifest
from insclr.shard.writer import parse_index


def as_manifest(shards):
    """A Manifest from a shard folder path or an already loaded Manifest."""
    return shards if isinstance(shards, Manifest) else Manifest.load(shards)


class ShardReader:
    """`read(indices) -> list of uint8 arrays` (the stored bytes of member `ext` of each sample).

    shards: shard folder or Manifest; split: "part" or "query"; threads: size of the read pool.
    """

    def __init__(self, shards, split="part", ext="jpg", threads=4):
        self.manifest = as_manifest(shards)
        infos = self.manifest.shards(split)
        n = self.manifest.num_samples(split)
        self.shard_of = np.empty(n, dtype=np.int32)
        self.offset = np.empty(n, dtype=np.int64)
        self.size = np.empty(n, dtype=np.int64)
        self._fds = []
        try:
            for s, info in enumerate(infos):
                self._load_shard(s, info, ext, n)
        except BaseException:
            self.close()
            raise
        covered = sum(info.count for info in infos)
        if covered != n:
            raise ValueError(f"{self.manifest.root}: shards of split {split!r} hold {covered} samples, "
                             f"manifest says {n}")
        self._pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="insclr-read")

    def _load_shard(self, s, info, ext, n):
        entries = parse_index(info.idx)
        if len(entries) != info.count:
            raise ValueError(f"{info.idx}: {len(entries)} samples, manifest says {info.count}")
        if info.first + info.count > n:
            raise ValueError(f"{info.idx}: samples {info.first}..{info.first + info.count - 1} exceed n={n}")
        for j, sample in enumerate(entries):
            if ext not in sample:
                raise ValueError(f"{info.idx}: sample {j} has no {ext!r} member (has {sorted(sample)})")
            off, size, _ = sample[ext]
            i = info.first + j
            self.shard_of[i], self.offset[i], self.size[i] = s, off, size
        self._fds.append(os.open(Path(info.tar), os.O_RDONLY))

    def __len__(self):
        return len(self.offset)

    def _read_one(self, i):
        fd = self._fds[self.shard_of[i]]
        size = int(self.size[i])
        data = os.pread(fd, size, int(self.offset[i]))
        if len(data) != size:
            raise OSError(f"short read of sample {i} from shard {self.shard_of[i]}: {len(data)} of {size} bytes")
        return np.frombuffer(data, dtype=np.uint8)

    def _check(self, indices):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in {self.manifest.root}")
        return indices

    def submit(self, indices):
        """Start reading `indices` in the pool; returns a list of futures (one per index)."""
        return [self._pool.submit(self._read_one, int(i)) for i in self._check(indices)]

    def read(self, indices):
        """The stored bytes of each sample, in the order of `indices`."""
        return [f.result() for f in self.submit(indices)]

    def close(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
