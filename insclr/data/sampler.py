"""Which rows a training step reads: neighbour-aware batches (ALGORITHM §4) and plain passes.

Both samplers are pure functions of (seed, step) with a `.step` cursor, so every rank computes
the same global batch without communication and `load_state_dict` resumes at any step.
Shared protocol (used by TrainLoader): `rank_batch(step) -> (indices, labels)` for this rank,
`next()`, `.step`, `num_steps` (None = endless), `state_dict()`, `load_state_dict()`.
"""

import numpy as np


def _check_rank(rank, world_size):
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


class _StepCursor:
    """The shared protocol: `next()` yields `rank_batch(self.step)` and advances; the state is the
    step plus the `_fixed` settings, which must match on resume (another N or B is another run)."""

    _fixed = ()
    num_steps = None

    def next(self):
        if self.num_steps is not None and self.step >= self.num_steps:
            raise StopIteration
        out = self.rank_batch(self.step)
        self.step += 1
        return out

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self):
        return {"step": self.step, **{key: getattr(self, key) for key in self._fixed}}

    def load_state_dict(self, state):
        for key in self._fixed:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}")
        self.step = int(state["step"])


class NeighborBatchSampler(_StepCursor):
    """B anchors per step from a permutation of [0, N), each followed by its first K neighbours.

    neighbors: int [N, >=K] the candidate pool's neighbours (CandidatePool.neighbors: row i =
    neighbours of sample i, best first); a memory map stays one, only the rows of a step are read.
    batch: B, the global number of anchors per step (split over ranks; B % world_size == 0).
    Epoch e uses the permutation of Generator([seed, e]); it is cut into N // B batches (the
    last partial batch dropped), then the next epoch starts.
    """

    _fixed = ("seed", "n", "batch", "k")

    def __init__(self, neighbors, batch, k, seed=0, rank=0, world_size=1):
        neighbors = np.asarray(neighbors)
        if neighbors.ndim != 2 or neighbors.shape[1] < k:
            raise ValueError(f"neighbors must be [N, >= k={k}], got shape {neighbors.shape}")
        _check_rank(rank, world_size)
        if batch % world_size:
            raise ValueError(f"batch {batch} (global anchors) is not divisible by world_size {world_size}")
        if not 0 < batch <= len(neighbors):
            raise ValueError(f"batch {batch} must be in [1, N={len(neighbors)}]")
        self.neighbors = neighbors[:, :k]  # a view: no per-rank copy of a million-row pool
        self.n, self.batch, self.k = len(neighbors), int(batch), int(k)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.steps_per_epoch = self.n // self.batch
        self.num_steps = None
        self.step = 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:  # one permutation per epoch, cached
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def anchors(self, step):
        """int64 [B]: the global anchors of `step`."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        return self._permutation(epoch)[pos * self.batch:(pos + 1) * self.batch]

    @staticmethod
    def _rows(anchors, neighbors):
        indices = np.concatenate([anchors, neighbors[anchors].reshape(-1)])
        labels = np.concatenate([anchors, np.repeat(anchors, neighbors.shape[1])]) + 1
        return indices.astype(np.int64), labels.astype(np.int64)

    def global_batch(self, step):
        """(indices, labels) int64 [B*(K+1)]: anchors, then anchor 0's K neighbours, anchor 1's, ...

        Labels are anchor + 1 for an anchor and for each of its neighbours.
        """
        return self._rows(self.anchors(step), self.neighbors)

    def rank_batch(self, step):
        """(indices, labels) int64 [B/W*(K+1)]: this rank's anchors, then their neighbours."""
        per = self.batch // self.world_size
        mine = self.anchors(step)[self.rank * per:(self.rank + 1) * per]
        return self._rows(mine, self.neighbors)



class SequentialBatches(_StepCursor):
    """One pass over [0, n) in global batches of `batch` consecutive indices (labels = index + 1).

    Each global batch is split over ranks in contiguous, equal slices; the last, partial global
    batch is padded by repeating its final index up to a multiple of world_size so that every
    rank gets the same number of rows (all-gathers need equal shapes; writing the same bank
    entry twice is harmless).
    """

    _fixed = ("n", "batch")

    def __init__(self, n, batch, rank=0, world_size=1):
        _check_rank(rank, world_size)
        if n < 1 or batch < 1:
            raise ValueError(f"SequentialBatches needs n >= 1 and batch >= 1, got n={n}, batch={batch}")
        if batch % world_size:
            raise ValueError(f"batch {batch} is not divisible by world_size {world_size}")
        self.n, self.batch, self.rank, self.world_size = int(n), int(batch), int(rank), int(world_size)
        self.num_steps = -(-self.n // self.batch)
        self.step = 0

    def __len__(self):
        return self.num_steps

    def global_batch(self, step):
        """(indices, labels) int64 of global batch `step` (padded to a multiple of world_size)."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} is outside this pass of {self.num_steps} batches")
        idx = np.arange(step * self.batch, min((step + 1) * self.batch, self.n), dtype=np.int64)
        pad = -len(idx) % self.world_size
        idx = np.concatenate([idx, np.full(pad, idx[-1], dtype=np.int64)])
        return idx, idx + 1

    def rank_batch(self, step):
        idx, labels = self.global_batch(step)
        per = len(idx) // self.world_size
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return idx[sl], labels[sl]
