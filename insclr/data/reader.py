"""Random access to the JPEG bytes of a shard set, by sample index, checked before any decode.

Every loader (training, feature extraction, evaluation) reads through `ShardReader`, so the
checks live here once. On opening, each shard's DALI index must match the sha256 the manifest
recorded (a swapped or edited index is refused) and each tar must have the recorded size and
hold every member the index points at (a truncated tar is refused). Each sample read is checked
by `jpeg_problem` (insclr/data/jpeg.py says why DALI must never see a damaged header) and a bad
one is reported with its shard, key and offset.

Each shard's DALI index is parsed once; each tar is opened once; bytes are read with
positional reads (os.pread: no shared file position, so the threads of the pool need no lock)
and can be requested ahead of use so that the disk is never what the decoder waits for.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from insclr.data.jpeg import jpeg_problem
from insclr.shard.manifest import Manifest
from insclr.shard.writer import parse_index, sample_key, sha256_file


def as_manifest(shards):
    """A Manifest from a shard folder path or an already loaded Manifest."""
    return shards if isinstance(shards, Manifest) else Manifest.load(shards)


def _remake_hint(root):
    return (f"`python -m insclr.shard --verify {root}` lists every problem; delete a damaged shard's files "
            f"(.tar, .idx, .json) and re-run the command that made the folder (manifest.json 'created_by') "
            f"to make it again")


class BadSample(ValueError):
    """A stored sample that cannot be decoded: `index` is its sample index, the message says where."""

    def __init__(self, message, index):
        super().__init__(message)
        self.index = index


class ShardReader:
    """`read(indices) -> list of uint8 arrays` (the stored bytes of member `ext` of each sample).

    shards: shard folder or Manifest; split: "part" or "query"; threads: size of the read pool.
    Raises ValueError / FileNotFoundError naming the file when the folder's files do not match
    its manifest; `read` raises BadSample for a sample whose bytes are not its JPEG.
    """

    def __init__(self, shards, split="part", ext="jpg", threads=4):
        self.manifest = as_manifest(shards)
        self.split, self.ext = split, ext
        infos = self.manifest.shards(split)
        n = self.manifest.num_samples(split)
        self.sizes = self.manifest.sizes(split) if ext == "jpg" else None
        self.shard_of = np.empty(n, dtype=np.int32)
        self.offset = np.empty(n, dtype=np.int64)
        self.size = np.empty(n, dtype=np.int64)
        self._infos, self._fds = infos, []
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
        root = self.manifest.root
        for path in (info.idx, info.tar):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing from the shard folder; {_remake_hint(root)}")
        if sha256_file(info.idx) != info.idx_sha256:
            raise ValueError(f"{info.idx}: not the index the manifest recorded for {info.tar.name} (sha256 "
                             f"differs: swapped, edited or damaged); {_remake_hint(root)}")
        tar_bytes = info.tar.stat().st_size
        if info.tar_bytes is not None and tar_bytes != info.tar_bytes:
            raise ValueError(f"{info.tar}: {tar_bytes} bytes, the manifest recorded {info.tar_bytes} "
                             f"({'truncated' if tar_bytes < info.tar_bytes else 'overwritten'}); {_remake_hint(root)}")
        entries = parse_index(info.idx)
        if len(entries) != info.count:
            raise ValueError(f"{info.idx}: {len(entries)} samples, manifest says {info.count}")
        if info.first + info.count > n:
            raise ValueError(f"{info.idx}: samples {info.first}..{info.first + info.count - 1} exceed n={n}")
        for j, sample in enumerate(entries):
            if ext not in sample:
                raise ValueError(f"{info.idx}: sample {j} has no {ext!r} member (has {sorted(sample)})")
            off, size, _ = sample[ext]
            if off + size > tar_bytes:
                raise ValueError(f"{info.tar}: sample {sample_key(info.first + j)} lies at bytes {off}..{off + size} "
                                 f"of a {tar_bytes}-byte tar (truncated?); {_remake_hint(root)}")
            i = info.first + j
            self.shard_of[i], self.offset[i], self.size[i] = s, off, size
        self._fds.append(os.open(Path(info.tar), os.O_RDONLY))

    def __len__(self):
        return len(self.offset)

    def where(self, i):
        """'TAR: sample KEY (offset O, S bytes)' of sample i."""
        tar = self._infos[self.shard_of[i]].tar
        return f"{tar}: sample {sample_key(int(i))} (offset {int(self.offset[i])}, {int(self.size[i])} bytes)"

    def bad_sample(self, i, reason):
        return BadSample(f"{self.where(i)}: {reason}; {_remake_hint(self.manifest.root)}", int(i))

    def _read_one(self, i):
        """(uint8 array, None) or (None, BadSample) for sample i."""
        fd = self._fds[self.shard_of[i]]
        size = int(self.size[i])
        data = os.pread(fd, size, int(self.offset[i]))
        if len(data) != size:
            return None, self.bad_sample(i, f"short read: {len(data)} of {size} bytes")
        if self.sizes is not None:
            problem = jpeg_problem(data, int(self.sizes[i, 0]), int(self.sizes[i, 1]))
            if problem:
                return None, self.bad_sample(i, problem)
        return np.frombuffer(data, dtype=np.uint8), None

    def _check(self, indices):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in {self.manifest.root}")
        return indices

    def submit(self, indices):
        """Start reading `indices` in the pool; returns a list of futures of (bytes or None, BadSample or None)."""
        return [self._pool.submit(self._read_one, int(i)) for i in self._check(indices)]

    def read(self, indices):
        """The stored bytes of each sample, in the order of `indices`; raises BadSample for the first bad one."""
        return [gather(f) for f in self.submit(indices)]

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


def gather(future):
    """The bytes of a `submit` future; raises its BadSample."""
    data, problem = future.result()
    if problem is not None:
        raise problem
    return data


def decode_failure(reader, candidates):
    """BadSample for a sample DALI failed to decode, given the sample indices it may be (the same
    batch row of the batches in flight): the first that Pillow cannot decode either."""
    import io

    from PIL import Image

    for i in candidates:
        try:
            with Image.open(io.BytesIO(reader.read([i])[0].tobytes())) as image:
                image.load()
        except BadSample as e:
            return e
        except Exception as e:  # Pillow's errors for corrupt data vary (OSError, SyntaxError, ...)
            return reader.bad_sample(i, f"the image data is damaged ({e})")
    return reader.bad_sample(candidates[0], "DALI could not decode it (Pillow could)")
