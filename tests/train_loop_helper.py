"""A candidate pool made from the shards' labels (for training tests that need no feature pass)."""

import numpy as np
from data_shards import make_shards

from insclr.io import save_npz
from insclr.shard.manifest import Manifest


def label_pool(shards, out, k=8, seed=0):
    """pool.npz where each image's neighbours are first the other images of its label (similarity
    0.9 down), then random others (below 0.5): what a good stage-0 pool looks like."""
    labels = Manifest.load(shards).labels("part")
    n = len(labels)
    rng = np.random.default_rng(seed)
    neighbors = np.zeros((n, k), dtype=np.int32)
    similarities = np.zeros((n, k), dtype=np.float16)
    for i in range(n):
        same = rng.permutation([j for j in np.flatnonzero(labels == labels[i]) if j != i])
        other = rng.permutation([j for j in np.flatnonzero(labels != labels[i])])
        row = np.concatenate([same, other])[:k]
        neighbors[i] = row
        similarities[i] = np.where(np.arange(k) < len(same), 0.9 - 0.01 * np.arange(k), 0.45 - 0.01 * np.arange(k))
    save_npz(out, neighbors=neighbors, similarities=similarities)
    return out


def labelled_set(root):
    """`root` with shards/ (24 labelled images, 8 per shard, no queries) and pool.npz (label_pool, k 6):
    the small training set of the training tests."""
    make_shards(root / "shards", n=24, per_shard=8, queries=0)
    label_pool(root / "shards", root / "pool.npz", k=6)
    return root
