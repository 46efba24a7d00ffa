"""insclr.rerank and insclr.whiten against the loop references of tests/reference_rerank.py."""

import numpy as np
import pytest
import torch

import reference_rerank as ref
from insclr import rerank, whiten

# float32 features and sums of ≤ 50 terms against float64 loops: 1e-5 covers the rounding
TOL = 1e-5


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, d, seed, clusters=12, noise=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (2, 0.0), (5, 3.0), (10, 1.5)])
def test_aqe_matches_loop(k, alpha):
    db, q = unit(300, 24, 0), unit(7, 24, 1)
    ours = rerank.aqe(q.astype(np.float32), db.astype(np.float32), k, alpha, chunk=64)  # numpy inputs too
    np.testing.assert_allclose(ours.numpy(), ref.aqe(q, db, k, alpha), atol=TOL)


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (3, 0.0), (10, 3.0)])
def test_dba_matches_loop(k, alpha):
    db = unit(200, 16, 2)
    ours = rerank.dba(torch.from_numpy(db).float(), k, alpha, rows=37, chunk=50)   # odd chunks: the seams
    np.testing.assert_allclose(ours.numpy(), ref.dba(db, k, alpha), atol=TOL)


def test_dba_from_a_given_graph_equals_the_search():
    db = torch.from_numpy(unit(150, 16, 3)).float()
    graph = rerank.knn_graph(db, 12, rows=40)
    assert torch.equal(rerank.dba(db, 8, 3.0, graph=graph), rerank.dba(db, 8, 3.0))


def test_knn_graph_excludes_self_and_is_exact():
    db = unit(120, 8, 4)
    nb, sims = rerank.knn_graph(torch.from_numpy(db).float(), 6, rows=25)
    for i in range(len(db)):
        order = [j for j in np.argsort(-(db @ db[i]), kind="stable") if j != i][:6]
        assert nb[i].tolist() == order
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(db @ db.T, nb.numpy(), 1), atol=TOL)


@pytest.mark.parametrize("k,query_k,gamma,alpha,truncate", [(5, 3, 3.0, 0.9, 60), (10, 5, 1.0, 0.99, 200),
                                                           (8, 10, 3.0, 0.5, 30)])
def test_diffusion_matches_dense_solve(k, query_k, gamma, alpha, truncate):
    db, q = clustered(200, 16, 5), clustered(6, 16, 6)
    # enough CG iterations to converge: the reference solves exactly. Condition number of I − αS
    # is ≤ (1 + α)/(1 − α) ≤ 199, so float32 CG leaves a relative error of about 1e-4
    ours = rerank.diffusion(torch.from_numpy(q).float(), torch.from_numpy(db).float(), k, query_k, gamma, alpha,
                            truncate, iterations=500, tol=1e-7).numpy()
    want = ref.diffusion(q, db, k, query_k, gamma, alpha, truncate)
    scale = np.abs(want - 3).max(axis=1, keepdims=True)
    np.testing.assert_allclose(ours, want, atol=1e-3 * scale.max())


def test_diffusion_defaults_rank_like_the_reference():
    db, q = clustered(400, 16, 7), clustered(5, 16, 8)
    ours = rerank.diffusion(q.astype(np.float32), db.astype(np.float32), truncate=150).numpy()
    want = ref.diffusion(q, db, 50, 10, 3.0, 0.99, 150)
    top_ours, top_want = np.argsort(-ours, 1)[:, :20], np.argsort(-want, 1)[:, :20]
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(top_ours, top_want)])
    assert overlap >= 0.9   # 20 CG iterations (the paper's) need not converge fully


def test_conjugate_gradient_solves_spd_systems():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 20, 20, generator=g, dtype=torch.float64)
    m = a @ a.transpose(1, 2) + 20 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(3, 20, generator=g, dtype=torch.float64)
    b[1] = 0          # a zero right-hand side stays zero
    x = rerank.conjugate_gradient(lambda p: torch.bmm(m, p[:, :, None])[:, :, 0], b, 100, 1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(m, b), atol=1e-9, rtol=0)


def test_parse_steps_and_labels():
    steps = rerank.parse_steps(["dba:k=10,alpha=3", "aqe:k=3", "diffusion:truncate=500"])
    assert [s.label for s in steps] == ["dba", "aqe:k=3", "diffusion:truncate=500"]
    assert steps[2].params["alpha"] == 0.99 and isinstance(steps[2].params["truncate"], int)
    for bad, words in [("qe", "unknown method"), ("aqe:n=2", "key=value"), ("aqe:k=x", "not a number"),
                       ("diffusion:alpha=1", "out of range"), ("dba:k=-1", "out of range")]:
        with pytest.raises(ValueError, match=words):
            rerank.parse_steps([bad])
    with pytest.raises(ValueError, match="last step"):
        rerank.parse_steps(["diffusion", "aqe"])


def test_apply_steps_compose_in_order():
    db, q = unit(100, 8, 9).astype(np.float32), unit(4, 8, 10).astype(np.float32)
    out = list(rerank.apply_steps(q, db, rerank.parse_steps(["dba:k=3", "aqe:k=2"])))
    assert [o[0] for o in out] == ["dba:k=3", "dba:k=3+aqe"]
    np.testing.assert_allclose(out[1][1].numpy(), ref.aqe(q, ref.dba(db, 3, 3.0), 2, 3.0), atol=TOL)
    assert out[1][3] is None


# ----------------------------------------------------------------------------- whitening


def test_pca_whitening_matches_svd_and_whitens():
    x = clustered(300, 12, 11) * np.linspace(0.2, 2, 12)
    mean, proj = whiten.pca_whitening(x, 8)
    want_mean, want = ref.pca_whiten(x, 8)
    np.testing.assert_allclose(mean.numpy(), want_mean, atol=1e-12)
    signs = np.sign((proj.numpy() * want).sum(1))        # components are defined up to sign
    np.testing.assert_allclose(proj.numpy() * signs[:, None], want, atol=1e-8)
    y = (x - mean.numpy()) @ proj.numpy().T
    np.testing.assert_allclose(np.cov(y.T), np.eye(8), atol=1e-8)
    with pytest.raises(ValueError, match="N-1"):
        whiten.pca_whitening(x[:5], 8)


def test_mutual_pairs_match_loop():
    db = clustered(150, 8, 12)
    nb, sims = rerank.knn_graph(torch.from_numpy(db).float(), 10)
    for k, thresh in [(1, 0.0), (5, 0.5), (10, 0.8)]:
        ours = whiten.mutual_pairs(nb.numpy(), sims.numpy(), k, thresh)
        want = ref.mutual_pairs(nb.numpy(), sims.numpy(), k, thresh)
        assert sorted(map(tuple, ours.tolist())) == [tuple(p) for p in want.tolist()]


@pytest.mark.parametrize("shrink", [0.0, 0.1])
def test_learned_whitening_matches_reference(shrink):
    x = clustered(400, 10, 13, noise=0.3)
    nb, sims = rerank.knn_graph(torch.from_numpy(x).float(), 5)
    pairs = whiten.mutual_pairs(nb.numpy(), sims.numpy(), 3, 0.5)
    mean, proj = whiten.learned_whitening(x, pairs, 6, shrink)
    want_mean, want = ref.learned_whiten(x, pairs, shrink)
    np.testing.assert_allclose(mean.numpy(), want_mean, atol=1e-12)
    signs = np.sign((proj.numpy() * want[:6]).sum(1))
    np.testing.assert_allclose(proj.numpy() * signs[:, None], want[:6], atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        whiten.learned_whitening(x, pairs[:1])


def test_whitening_file_round_trip_and_apply(tmp_path):
    x = clustered(200, 12, 14).astype(np.float32)
    mean, proj = whiten.pca_whitening(x, 6)
    path = tmp_path / "W.npz"
    whiten.save_whitening(path, mean.numpy(), proj.numpy(), "pca", source="f.npy", count=200)
    w = whiten.load_whitening(path)
    assert (w.kind, w.renormalize, w.dim, w.meta["count"]) == ("pca", True, 6, 200)
    y = whiten.apply_whitening(x, w, dim=4)
    want = (x - w.mean) @ w.projection[:4].T
    np.testing.assert_allclose(y, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    assert torch.is_tensor(whiten.apply_whitening(torch.from_numpy(x), w))
    with pytest.raises(ValueError, match="expects 12-d"):
        whiten.apply_whitening(x[:, :5], w)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="missing arrays"):
        whiten.load_whitening(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="insclr.whiten"):
        whiten.load_whitening(tmp_path / "none.npz")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    db, q = clustered(3000, 64, 15), clustered(20, 64, 16)
    cpu = (rerank.aqe(q, db, 3, 3.0), rerank.dba(db, 10, 3.0), rerank.diffusion(q, db, truncate=500))
    gpu = (rerank.aqe(q, db, 3, 3.0, device="cuda"), rerank.dba(db, 10, 3.0, device="cuda"),
           rerank.diffusion(q, db, truncate=500, device="cuda"))
    # different matmul kernels (TF32 is off by default for matmuls) and atomic sums: 1e-4
    for a, b in zip(cpu[:2], gpu[:2]):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    top_cpu, top_gpu = cpu[2].topk(50).indices, gpu[2].cpu().topk(50).indices
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 50 for a, b in zip(top_cpu, top_gpu)])
    assert overlap >= 0.98
