"""insclr.bench.fidelity's counting of kept decisions, on small synthetic features."""

import numpy as np
import torch

from insclr.bench.fidelity import bank_agreement, pool_overlap, selection_agreement
from insclr.pool import knn


def clustered(n=120, d=16, seed=0):
    """L2-normalised features in clusters of 6 (so the pool and the banks have positives to find)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 6, d))
    x = np.repeat(centres, 6, axis=0) + 0.35 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_identical_inputs_keep_every_decision():
    f = clustered()
    nb, sim = knn(f, 20)
    assert pool_overlap(nb, nb) == 1.0
    kept, pairs, _ = selection_agreement(f, f, nb, 3, 0.6)
    assert kept == 1.0 and pairs == 3 * len(f)
    kept, union = bank_agreement((nb, sim), (nb, sim), f, f, torch.float32, 5, 4, 3, "b+i_tr2_avg0.60_k05", 0.75, 0.5)
    assert kept == 1.0 and union > 0


def test_counts_flips_by_hand():
    # two rows whose neighbour lists share 1 of 2; selection: one pair of two crosses the cut
    assert pool_overlap(np.array([[1, 2], [0, 2]]), np.array([[1, 3], [0, 2]])) == 0.75
    g = np.array([[1.0, 0.0], [0.8, 0.6], [0.5, np.sqrt(0.75)]], dtype=np.float32)   # sims 0.8, 0.5 with row 0
    h = np.array([[1.0, 0.0], [0.8, 0.6], [0.7, np.sqrt(0.51)]], dtype=np.float32)   # sims 0.8, 0.7
    neighbors = np.array([[1, 2], [0, 2], [0, 1]])
    kept, pairs, _ = selection_agreement(g, h, neighbors[:1], 2, 0.6)
    assert pairs == 2 and kept == 0.5


def test_reduced_bank_tables_flip_few_decisions():
    f = clustered(seed=1)
    nb, sim = knn(f, 20)
    kept, _ = bank_agreement((nb, sim), (nb, sim), f, f, torch.bfloat16, 5, 4, 3, "b+i_tr2_avg0.60_k05", 0.75, 0.5)
    assert 0.5 < kept <= 1.0
