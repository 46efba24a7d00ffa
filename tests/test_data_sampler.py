"""Batch samplers (ALGORITHM §4): composition, labels, rank slices, resume."""

import numpy as np
import pytest

from insclr.data import NeighborBatchSampler, SequentialBatches


def _pool(n=20, k=5):
    return np.stack([(np.arange(n) + j) % n for j in range(1, k + 1)], axis=1).astype(np.int32)


def test_neighbor_batch_composition_and_labels():
    nb = _pool()
    s = NeighborBatchSampler(nb, batch=4, k=3, seed=7)
    idx, lab = s.global_batch(0)
    anchors = s.anchors(0)
    assert idx.dtype == lab.dtype == np.int64 and len(idx) == 4 * 4
    assert np.array_equal(idx[:4], anchors)
    for a_pos, a in enumerate(anchors):
        assert np.array_equal(idx[4 + 3 * a_pos:4 + 3 * (a_pos + 1)], nb[a, :3])
        assert np.all(lab[4 + 3 * a_pos:4 + 3 * (a_pos + 1)] == a + 1)
    assert np.array_equal(lab[:4], anchors + 1) and lab.min() >= 1


def test_epochs_are_permutations_with_partial_batch_dropped():
    s = NeighborBatchSampler(_pool(n=22), batch=5, k=2, seed=1)
    assert s.steps_per_epoch == 4
    ep0 = np.concatenate([s.anchors(t) for t in range(4)])
    ep1 = np.concatenate([s.anchors(t) for t in range(4, 8)])
    assert len(set(ep0.tolist())) == 20 and len(set(ep1.tolist())) == 20
    assert not np.array_equal(ep0, ep1)  # a new permutation per epoch
    assert np.array_equal(np.random.default_rng([1, 0]).permutation(22)[:20], ep0)


def test_two_ranks_partition_the_global_batch():
    nb = _pool()
    ranks = [NeighborBatchSampler(nb, batch=6, k=3, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        gidx, glab = ranks[0].global_batch(step)
        parts = [r.next() for r in ranks]
        anchors = gidx[:6]
        for r, (idx, lab) in enumerate(parts):
            mine = anchors[3 * r:3 * (r + 1)]
            assert np.array_equal(idx[:3], mine)
            assert np.array_equal(idx[3:], nb[mine, :3].reshape(-1))
            assert np.array_equal(lab, np.concatenate([mine, np.repeat(mine, 3)]) + 1)
        # Rows of both ranks are exactly the rows of the global batch (as multisets with labels).
        rows_idx = np.concatenate([p[0] for p in parts]).tolist()
        rows_lab = np.concatenate([p[1] for p in parts]).tolist()
        both = sorted(zip(rows_idx, rows_lab))
        assert both == sorted(zip(gidx.tolist(), glab.tolist()))


def test_resume_equals_uninterrupted_sequence():
    nb = _pool()
    full = NeighborBatchSampler(nb, batch=4, k=3, seed=5)
    seq = [full.next() for _ in range(12)]
    a = NeighborBatchSampler(nb, batch=4, k=3, seed=5)
    first = [a.next() for _ in range(7)]
    b = NeighborBatchSampler(nb, batch=4, k=3, seed=5)
    b.load_state_dict(a.state_dict())
    rest = [b.next() for _ in range(5)]
    for (i1, l1), (i2, l2) in zip(seq, first + rest):
        assert np.array_equal(i1, i2) and np.array_equal(l1, l2)
    with pytest.raises(ValueError, match="seed"):
        NeighborBatchSampler(nb, batch=4, k=3, seed=6).load_state_dict(a.state_dict())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="world_size"):
        NeighborBatchSampler(_pool(), batch=5, k=3, world_size=2)
    with pytest.raises(ValueError, match="k=6"):
        NeighborBatchSampler(_pool(k=5), batch=4, k=6)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sequential_batches_cover_every_index(world_size):
    n, batch = 23, 6
    seen = []
    ranks = [SequentialBatches(n, batch, rank=r, world_size=world_size) for r in range(world_size)]
    assert len(ranks[0]) == 4
    for step in range(len(ranks[0])):
        parts = [r.next() for r in ranks]
        assert len({len(p[0]) for p in parts}) == 1  # equal rows on every rank
        for idx, lab in parts:
            assert np.array_equal(lab, idx + 1)
            seen.extend(idx.tolist())
    assert sorted(set(seen)) == list(range(n))
    with pytest.raises(StopIteration):
        ranks[0].next()
    s = SequentialBatches(n, batch, world_size=world_size)
    s.load_state_dict({"step": 2, "n": n, "batch": batch})
    assert s.next()[0][0] == 12  # rank 0 starts global batch 2
