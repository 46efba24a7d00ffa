"""insclr.candidates: the candidate pool memory-mapped from pool.npz, its checks, the synthetic pool."""

import numpy as np
import pytest

from insclr.candidates import CandidatePool
from insclr.io import save_npz
from insclr.synth.pool import random_pool, write_pool


def test_open_maps_the_stored_members_without_widening(tmp_path):
    pool = random_pool(300, 7, seed=3, identity="abc")
    save_npz(tmp_path / "pool.npz", neighbors=pool.neighbors, similarities=pool.similarities,
             shards_identity=np.array("abc"))
    got = CandidatePool.open(tmp_path / "pool.npz")
    assert isinstance(got.neighbors, np.memmap) and isinstance(got.similarities, np.memmap)
    assert (got.neighbors.dtype, got.similarities.dtype) == (np.int32, np.float16)
    assert np.array_equal(got.neighbors, pool.neighbors) and np.array_equal(got.similarities, pool.similarities)
    assert (got.identity, got.num_samples, got.k) == ("abc", 300, 7)
    got.check_for_training(300, 7)
    with pytest.raises(ValueError, match="data.k=8 needs more"):
        got.check_for_training(300, 8)
    with pytest.raises(ValueError, match="does not match the 299 training images"):
        got.check_for_training(299, 3)


def test_streamed_synthetic_pool_equals_the_in_memory_one(tmp_path):
    write_pool(tmp_path / "pool.npz", 1000, 12, seed=1, identity="xyz")
    pool, want = CandidatePool.open(tmp_path / "pool.npz"), random_pool(1000, 12, seed=1)
    assert np.array_equal(pool.neighbors, want.neighbors) and np.array_equal(pool.similarities, want.similarities)
    assert pool.identity == "xyz" and pool.index_range()[0] >= 0 and pool.index_range()[1] < 1000
    with np.load(tmp_path / "pool.npz") as z:                  # still an ordinary .npz
        assert np.array_equal(z["neighbors"], want.neighbors)
    assert (np.diff(pool.similarities.astype(np.float32), axis=1) <= 0).all()


def test_files_training_cannot_map_are_refused_by_name(tmp_path):
    nb = np.stack([(np.arange(6) + j) % 6 for j in range(1, 3)], axis=1)
    sims = np.full((6, 2), 0.5)
    path = tmp_path / "pool.npz"
    np.savez_compressed(path, neighbors=nb.astype(np.int32), similarities=sims.astype(np.float16))
    with pytest.raises(ValueError, match=f"{path}: neighbors.npy is compressed"):
        CandidatePool.open(path)
    np.savez(path, neighbors=nb.astype(np.int64), similarities=sims.astype(np.float64))
    with pytest.raises(ValueError, match=f"{path}: neighbors int64 / similarities float64; a candidate pool holds"):
        CandidatePool.open(path)
    np.savez(path, neighbors=nb.astype(np.int32))
    with pytest.raises(ValueError, match="missing arrays \\['similarities'\\]"):
        CandidatePool.open(path)
    np.savez(path, neighbors=nb.astype(np.int32), similarities=sims.astype(np.float16))
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match=f"{path}: not a readable candidate pool"):
        CandidatePool.open(path)
    with pytest.raises(FileNotFoundError, match="candidate pool not found"):
        CandidatePool.open(tmp_path / "none.npz")


def test_from_arrays_narrows_and_the_values_are_checked():
    nb = np.stack([(np.arange(5) + j) % 5 for j in range(1, 4)], axis=1)
    pool = CandidatePool.from_arrays(nb.astype(np.int64), np.full((5, 3), 0.5))
    assert (pool.neighbors.dtype, pool.similarities.dtype) == (np.int32, np.float32)
    assert CandidatePool.from_arrays(nb, np.full((5, 3), 0.5, np.float16)).similarities.dtype == np.float16
    pool.check_values()
    nb[2, 1] = 2
    with pytest.raises(ValueError, match="row 2 lists itself"):
        CandidatePool.from_arrays(nb, np.full((5, 3), 0.5)).check_values()
    with pytest.raises(ValueError, match="two \\[N, k\\] arrays"):
        CandidatePool.from_arrays(nb, np.full((5, 2), 0.5))


def test_pool_memory_benchmark_runs_small(tmp_path):
    from insclr.bench.pool_memory import run

    fig = run(n=4000, k=40, baseline_n=2000, folder=tmp_path)
    assert fig["ratio"] > 0 and fig["baseline_extrapolated"]
    assert fig["ours"]["bank_v2_setup_s"] > 0 and fig["baseline"]["private_peak_bytes"] > 0
