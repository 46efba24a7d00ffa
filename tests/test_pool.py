"""insclr.pool: exact kNN against a brute-force numpy reference, chunking, both back ends, CLI."""

import json

import numpy as np
import pytest

from insclr import pool


def integer_features(n=240, d=16, seed=0, duplicates=((5, 17, 99), (3, 4), (200, 201, 202, 203))):
    """Small-integer vectors: every dot product is exact in float32 (so every path must agree
    bit for bit), distinct vectors do tie, and the listed groups are identical copies."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-8, 9, size=(n, d)).astype(np.float16)
    for group in duplicates:
        x[list(group)] = x[group[0]]
    return x


def brute_force(features, k):
    """Reference: all pairwise products, own index removed, sorted by (-similarity, index)."""
    x = features.astype(np.int64)
    sims = x @ x.T
    n = len(x)
    neighbors = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        order = np.lexsort((others, -sims[i, others]))  # primary: -sim, then index
        neighbors[i] = others[order[:k]]
    return neighbors, np.take_along_axis(sims, neighbors, 1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_equals_brute_force_with_duplicates(backend):
    x = integer_features()
    ref_nb, ref_sim = brute_force(x, 20)
    nb, sim = pool.knn(x, k=20, chunk=64, backend=backend)
    assert nb.dtype == np.int32 and sim.dtype == np.float32 and nb.shape == (240, 20)
    np.testing.assert_array_equal(nb, ref_nb)
    np.testing.assert_array_equal(sim, ref_sim.astype(np.float32))  # integer products: exact in float32
    _, sim16 = pool.knn(x, k=20, chunk=64, backend=backend, dtype=np.float16)
    np.testing.assert_array_equal(sim16, ref_sim.astype(np.float16))
    # the query never appears; its identical copies come first (largest possible product)
    assert not (nb == np.arange(240)[:, None]).any()
    assert list(nb[17, :2]) == [5, 99] and list(nb[202, :3]) == [200, 201, 203]


def test_chunking_and_backends_agree():
    x = integer_features(seed=1)
    results = [pool.knn(x, k=30, chunk=c, backend=b) for b in ("faiss", "torch") for c in (1, 7, 240)]
    for nb, sim in results[1:]:
        np.testing.assert_array_equal(nb, results[0][0])
        np.testing.assert_array_equal(sim, results[0][1])


def test_normalised_float_features_agree():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16)
    x[10] = x[11]
    nb_f, sim_f = pool.knn(x, k=10, backend="faiss")
    nb_t, sim_t = pool.knn(x, k=10, backend="torch")
    assert (nb_f == nb_t).mean() > 0.99   # only float32 near-ties may swap
    # float32 dot products of D=32 unit rows by two kernels differ by <= 32 u; stored in fp16, the
    # similarities then differ by at most one fp16 step, 2^-11 below 1
    np.testing.assert_allclose(sim_f.astype(np.float32), sim_t.astype(np.float32), rtol=0, atol=2 * 2 ** -11)
    assert nb_f[10, 0] == 11 and nb_f[11, 0] == 10
    assert (np.diff(sim_f.astype(np.float32), axis=1) <= 0).all()


def test_exclude_self_drops_last_column_when_self_absent():
    import torch

    sims = torch.tensor([[0.9, 0.8, 0.8, 0.1], [0.9, 0.9, 0.5, 0.4]])
    idx = torch.tensor([[7, 9, 2, 5], [1, 0, 3, 6]])
    nb, s = pool.exclude_self_topk(sims, idx, torch.tensor([0, 1]), k=3)
    assert nb.tolist() == [[7, 2, 9], [0, 3, 6]]
    np.testing.assert_allclose(s.numpy(), [[0.9, 0.8, 0.8], [0.9, 0.5, 0.4]])


def test_non_finite_and_bad_k_are_errors(tmp_path, capsys):
    x = integer_features()
    x[33, 2] = np.nan
    with pytest.raises(ValueError, match="row 33"):
        pool.knn(x, k=5)
    path = tmp_path / "features.npy"
    np.save(path, x)
    assert pool.main(["--features", str(path), "--out", str(tmp_path / "pool.npz"), "--k", "5"]) == 2
    assert f"error: {path}: row 33 is not finite" in capsys.readouterr().err
    assert pool.main(["--features", str(path), "--out", str(tmp_path / "pool.npz")]) == 2  # k=500 > N-1
    assert "error: --k 500: must be between 1 and N-1 = 239" in capsys.readouterr().err
    assert not (tmp_path / "pool.npz").exists()
    with pytest.raises(ValueError, match="k=240"):
        pool.knn(integer_features(), k=240)
    path.write_bytes(b"\x93NUMPY truncated")
    assert pool.main(["--features", str(path), "--out", str(tmp_path / "pool.npz")]) == 2
    assert f"error: {path}: not a readable .npy features file" in capsys.readouterr().err


def test_neighbor_precision():
    nb = np.array([[1, 2, 3], [0, 3, 2], [3, 0, 1], [2, 1, 0]])
    labels = np.array([0, 0, 1, -1])
    p = pool.neighbor_precision(nb, labels, ks=(1, 3, 10))
    assert p == {1: pytest.approx(2 / 3), 3: pytest.approx((1 / 3 + 1 / 3 + 0) / 3)}


def test_cli_writes_pool(tmp_path):
    x = integer_features()
    np.save(tmp_path / "features.npy", x)
    out = tmp_path / "run" / "pool.npz"
    assert pool.main(["--features", str(tmp_path / "features.npy"), "--out", str(out), "--k", "12"]) == 0
    data = np.load(out)
    np.testing.assert_array_equal(data["neighbors"], brute_force(x, 12)[0])
    assert data["similarities"].dtype == np.float32
    summary = json.loads((tmp_path / "run" / "pool.json").read_text())
    assert summary["k"] == 12 and summary["num_samples"] == 240 and summary["dtype"] == "float32"
    assert pool.main(["--features", str(tmp_path / "features.npy"), "--out", str(out), "--k", "12",
                      "--dtype", "float16"]) == 0
    assert np.load(out)["similarities"].dtype == np.float16


def test_cli_reports_precision_from_manifest_labels(tmp_path, capsys):
    x = integer_features()
    np.save(tmp_path / "features.npy", x)
    labels = [None if i % 7 == 0 else i % 4 for i in range(240)]
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"format": "insclr-shards/1", "dataset": "folder",
                "splits": {"part": {"num_samples": 240, "shards": [], "labels": labels}}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "pool.npz"
    pool.main(["--features", str(tmp_path / "features.npy"), "--out", str(out), "--k", "60",
               "--shards", str(shards)])
    summary = json.loads((tmp_path / "pool.json").read_text())
    want = pool.neighbor_precision(brute_force(x, 60)[0], np.array([-1 if v is None else v for v in labels]))
    assert summary["precision"] == {str(k): pytest.approx(v) for k, v in want.items()}
    assert set(summary["precision"]) == {"1", "3", "10", "50"}
    assert "neighbour precision@50" in capsys.readouterr().out
    manifest["splits"]["part"]["labels"] = labels[:10]
    manifest["splits"]["part"]["num_samples"] = 10
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert pool.main(["--features", str(tmp_path / "features.npy"), "--out", str(out),
                      "--shards", str(shards)]) == 2
    assert "10 samples but" in capsys.readouterr().err


@pytest.mark.gpu
def test_torch_on_cuda_equals_brute_force():
    x = integer_features(seed=3)
    nb, sim = pool.knn(x, k=25, chunk=50, backend="torch", device="cuda")
    ref_nb, ref_sim = brute_force(x, 25)
    np.testing.assert_array_equal(nb, ref_nb)
    np.testing.assert_array_equal(sim, ref_sim.astype(np.float32))
