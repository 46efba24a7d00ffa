"""The command lines of whitening and re-ranking: insclr.whiten, insclr.features --whiten,
insclr.evaluate --whiten/--rerank/--pca, and the scoring of a diffusion score matrix."""

import json

import numpy as np
import pytest
import torch

import reference_rerank as ref
from insclr import rerank, whiten
from insclr.evaluate import main as evaluate_main
from insclr.evaluate.core import score
from insclr.evaluate.datasets import EvalSet
from insclr.evaluate.variants import parse_pca, pca_protocol, score_matrix, variants
from insclr.io import save_npy, save_npz


def clustered(n, d, seed, clusters=8, noise=0.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    x = rng.standard_normal((clusters, d))[labels] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def eval_sets(n=120, nq=6, d=16):
    """A revisitop-, an INSTRE- and a GLDv2-like set over the same clustered features."""
    x, labels = clustered(n + nq, d, 0, noise=1.5)
    db, q, lq, ldb = x[:n], x[n:], labels[n:], labels[:n]
    same = [np.flatnonzero(ldb == c).tolist() for c in lq]
    rev = [{"easy": s[::2], "hard": s[1::2][:-1], "junk": s[-1:]} for s in same]
    sets = [EvalSet("roxford5k", "revisitop", None, None, "query", "query", rev, 64, (1.0,)),
            EvalSet("instre", "instre", None, None, "query", "query", [{"ok": s} for s in same], 64, (1.0,)),
            EvalSet("gldv2", "gldv2", None, None, "part", "longest",
                    [{"usage": u, "positives": s} for u, s in zip(["Public", "Private"] * nq, same)], 64, (1.0,))]
    return sets, q, db


@pytest.mark.parametrize("which", [0, 1, 2])
def test_score_matrix_equals_feature_scoring(which):
    sets, q, db = eval_sets()
    es = sets[which]
    assert 0.2 < score(es, q, db, "cpu")[0].get("mapM", score(es, q, db, "cpu")[0].get("map", 0.5)) < 0.95
    assert score_matrix(es, torch.from_numpy(q @ db.T)) == score(es, q, db, "cpu")[0]


def test_variants_chain_whiten_rerank_and_pca():
    sets, q, db = eval_sets()
    es = sets[0]
    mean, proj = whiten.pca_whitening(db, 8)
    w = whiten.Whitening(mean.float().numpy(), proj.float().numpy(), "pca")
    steps = rerank.parse_steps(["dba:k=3", "aqe", "diffusion:k=5,truncate=40"])
    out, skipped = variants(es, q, db, "cpu", w, steps, (4, 500))
    assert list(out) == ["whiten", "whiten+dba:k=3", "whiten+dba:k=3+aqe",
                         "whiten+dba:k=3+aqe+diffusion:k=5,truncate=40", "pca4"]
    assert list(skipped) == ["pca500"]
    wq, wdb = whiten.apply_whitening(q, w), whiten.apply_whitening(db, w)
    want_db = ref.dba(wdb.astype(np.float64), 3, 3.0)
    want_q = ref.aqe(wq.astype(np.float64), want_db, 2, 3.0)
    assert out["whiten+dba:k=3+aqe"]["mapM"] == pytest.approx(score(es, want_q, want_db, "cpu")[0]["mapM"], abs=1e-9)
    scores = ref.diffusion(want_q, want_db, 5, 10, 3.0, 0.99, 40)
    # CG (20 iterations) against the exact solve: the ranking may differ slightly
    assert out["whiten+dba:k=3+aqe+diffusion:k=5,truncate=40"]["mapM"] == pytest.approx(
        score_matrix(es, torch.from_numpy(scores))["mapM"], abs=0.02)


def test_pca_protocol_is_sklearn_pca_whiten_without_renormalisation():
    _, q, db = eval_sets()
    pq, pdb = pca_protocol(q, db, 5)
    mean, proj = ref.pca_whiten(db.astype(np.float64), 5)
    # dot products do not depend on the components' signs; float32 features: 1e-4
    np.testing.assert_allclose(pq @ pdb.T, ((q - mean) @ proj.T) @ ((db - mean) @ proj.T).T, atol=1e-3)
    assert not np.allclose(np.linalg.norm(pdb, axis=1), 1)
    assert parse_pca("128,256") == (128, 256)
    with pytest.raises(ValueError, match="--pca"):
        parse_pca("128,x")


def test_whiten_command(tmp_path, capsys):
    from insclr.pool import main as pool_main
    from insclr.whiten import main

    x, _ = clustered(300, 12, 1, noise=0.3)
    save_npy(tmp_path / "f.npy", x.astype(np.float16))
    assert pool_main(["--features", str(tmp_path / "f.npy"), "--k", "10", "--out", str(tmp_path / "pool.npz")]) == 0
    assert main(["--features", str(tmp_path / "f.npy"), "--pca", "6", "--out", str(tmp_path / "pca.npz")]) == 0
    w = whiten.load_whitening(tmp_path / "pca.npz")
    assert (w.kind, w.dim, w.meta["count"]) == ("pca", 6, 300)
    assert main(["--features", str(tmp_path / "f.npy"), "--pool", str(tmp_path / "pool.npz"), "--thresh", "0.8",
                 "--dim", "8", "--out", str(tmp_path / "lw.npz")]) == 0
    w = whiten.load_whitening(tmp_path / "lw.npz")
    assert (w.kind, w.dim, w.meta["thresh"]) == ("learned", 8, 0.8) and w.meta["pairs"] > 10
    assert "mutual 5-NN pairs" in capsys.readouterr().out
    assert main(["--features", str(tmp_path / "f.npy"), "--pool", str(tmp_path / "pool.npz"), "--thresh", "1.5",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "at least 2 matching pairs" in capsys.readouterr().err
    save_npz(tmp_path / "short.npz", neighbors=np.array([[1], [0]], np.int32), similarities=np.ones((2, 1), np.float16))
    assert main(["--features", str(tmp_path / "f.npy"), "--pool", str(tmp_path / "short.npz"),
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "2 rows but" in capsys.readouterr().err


def test_evaluate_and_features_with_whitening_and_rerank(shards_dir, tmp_path, capsys):
    from insclr.features import main as features_main

    common = ["--model", "random", "--arch", "resnet18", "--head", "identity"]
    feats = tmp_path / "f.npy"
    assert features_main(["--shards", str(shards_dir / "gldv2"), *common, "--size", "32", "--scales", "1",
                          "--device", "cpu", "--threads", "1", "--out", str(feats)]) == 0
    assert whiten.main(["--features", str(feats), "--pca", "16", "--out", str(tmp_path / "W.npz")]) == 0
    js = tmp_path / "r.json"
    assert evaluate_main([*common, "--data", "roxford5k,instre", "--shards-root", str(shards_dir), "--size", "64",
                          "--scales", "1", "--device", "cpu", "--whiten", str(tmp_path / "W.npz"),
                          "--rerank", "dba:k=3", "--rerank", "aqe:k=1", "--rerank", "diffusion:k=5,truncate=30",
                          "--pca", "8,4096", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "roxford5k +whiten+dba:k=3+aqe:k=1 " in out and "instre +pca8 " in out
    data = json.loads(js.read_text())
    r = data["results"]
    assert list(r["instre"]["variants"]) == ["whiten", "whiten+dba:k=3", "whiten+dba:k=3+aqe:k=1",
                                             "whiten+dba:k=3+aqe:k=1+diffusion:k=5,truncate=30", "pca8"]
    assert "pca4096" in r["roxford5k"]["variants_skipped"]
    assert 0 <= r["roxford5k"]["variants"]["whiten"]["mapM"] <= 1
    assert data["meta"]["rerank"] == ["dba:k=3", "aqe:k=1", "diffusion:k=5,truncate=30"]
    # --whiten in insclr.features: the same projection, stored re-normalised in the features' dtype
    assert features_main(["--shards", str(shards_dir / "gldv2"), *common, "--size", "32", "--scales", "1",
                          "--device", "cpu", "--threads", "1", "--whiten", str(tmp_path / "W.npz"),
                          "--out", str(tmp_path / "fw.npy")]) == 0
    fw = np.load(tmp_path / "fw.npy")
    want = whiten.apply_whitening(np.load(feats), whiten.load_whitening(tmp_path / "W.npz"))
    assert fw.shape == want.shape == (len(np.load(feats)), 16) and fw.dtype == np.load(feats).dtype
    # the same extraction twice; 2e-3 would also cover --dtype float16 storage (spacing 2^-11 below 1)
    np.testing.assert_allclose(fw.astype(np.float32), want, atol=2e-3)
    assert json.loads((tmp_path / "fw.json").read_text())["whiten"] == str(tmp_path / "W.npz")
    for bad, words in [(["--rerank", "qe"], "unknown method"), (["--pca", "0"], "--pca"),
                       (["--whiten", str(tmp_path / "none.npz")], "not found")]:
        assert evaluate_main([*common, "--data", "roxford5k", "--shards-root", str(shards_dir), *bad]) == 2
        assert words in capsys.readouterr().err
