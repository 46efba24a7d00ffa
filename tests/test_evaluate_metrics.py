"""revisitop_map and friends against the straightforward reference in tests/reference_revisitop.py."""

import numpy as np
import pytest
import torch

from insclr.evaluate import revisitop_map
from insclr.evaluate.metrics import (average_precision, gldv2_map_at_k, instre_map, item_ranks,
                                     item_ranks_from_features, pad_items, revisitop_map_features,
                                     topk_from_features)
from reference_revisitop import compute_map, full_ranking, revisitop_reference

KEYS = ("mapE", "mapM", "mapH")


def random_gnd(rng, nq, n, empty_every=4):
    """Disjoint easy/hard/junk sets per query; every `empty_every`-th query has no hard ones
    and every (2·empty_every)-th none at all, to exercise queries without positives."""
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n)
        ne, nh, nj = rng.integers(0, 8), rng.integers(1, 8), rng.integers(0, 10)
        if q % empty_every == 1:
            nh = 0
        if q % (2 * empty_every) == 3:
            ne = nh = 0
        gnd.append({"easy": perm[:ne].tolist(), "hard": perm[ne:ne + nh].tolist(),
                    "junk": perm[ne + nh:ne + nh + nj].tolist(), "bbx": [0, 0, 1, 1]})
    return gnd


def assert_same(ours, ref, kappas=(1, 5, 10)):
    """float64 on both sides: sums of at most a few thousand terms in another order stay within
    1e-13 (n·u with u = 1.1e-16), far inside 1e-9."""
    for s in "EMH":
        np.testing.assert_allclose(ours["map" + s], ref["map" + s], rtol=0, atol=1e-9)
        np.testing.assert_allclose(ours["mpr" + s], ref["mpr" + s], rtol=0, atol=1e-9)
        np.testing.assert_allclose(ours["aps" + s], ref["aps" + s], rtol=0, atol=1e-9, equal_nan=True)
        np.testing.assert_allclose(ours["prs" + s], ref["prs" + s], rtol=0, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_tie_free(seed):
    rng = np.random.default_rng(seed)
    nq, n = 13, 400
    scores = rng.standard_normal((nq, n))     # float64: no ties
    gnd = random_gnd(rng, nq, n)
    ref = revisitop_reference(scores, gnd, kind="quicksort")  # the original's argsort; no ties to differ on
    assert_same(revisitop_map(scores, gnd), ref)
    assert_same(revisitop_map(torch.from_numpy(scores).float(), gnd),
                revisitop_reference(scores.astype(np.float32), gnd))
    assert_same(revisitop_map(scores, gnd, chunk=37), ref)     # many chunks, ragged last one
    assert np.isnan(ref["apsE"][3]) and np.isnan(ref["apsH"][1])   # empty positive sets were exercised


def test_ties_are_broken_by_database_index():
    rng = np.random.default_rng(5)
    nq, n = 9, 300
    scores = rng.integers(0, 6, size=(nq, n)).astype(np.float32)   # massive ties
    gnd = random_gnd(rng, nq, n)
    ref = revisitop_reference(scores, gnd, kind="stable")
    for chunk in (None, 64, 1000):
        assert_same(revisitop_map(scores, gnd, chunk=chunk), ref)
    # the rank definition itself: stable descending order
    items = pad_items([np.arange(n)] * nq, n)
    ranks = item_ranks(scores, items, chunk=50).numpy()
    order = full_ranking(scores).T
    expect = np.empty_like(order)
    np.put_along_axis(expect, order, np.arange(n)[None].repeat(nq, 0), axis=1)
    np.testing.assert_array_equal(ranks, expect)


def test_all_queries_empty_and_tiny_cases():
    scores = np.array([[0.9, 0.1, 0.5]])
    out = revisitop_map(scores, [{"easy": [], "hard": [], "junk": [1]}])
    assert np.isnan(out["mapM"]) and np.isnan(out["mprM"]).all()
    # positive ranked first: AP 1; positive behind one junk image: still AP 1 once junk is removed
    assert revisitop_map(scores, [{"easy": [0], "hard": [], "junk": []}])["mapE"] == 1.0
    assert revisitop_map(scores, [{"easy": [2], "hard": [], "junk": [0]}])["mapM"] == 1.0
    # closed form: one positive at rank 1 (0-based), no junk: trapezoid (0/1 + 1/2) / 2 = 0.25
    assert revisitop_map(scores, [{"easy": [2], "hard": [], "junk": []}])["mapE"] == 0.25
    ap, prs = average_precision([1], [])
    assert ap == 0.25 and prs.tolist() == [0.0, 0.5, 0.5]      # k clipped to the last positive (2)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="outside"):
        revisitop_map(np.zeros((1, 3)), [{"easy": [3], "hard": [], "junk": []}])
    with pytest.raises(ValueError, match="queries=2"):
        revisitop_map(np.zeros((1, 3)), [{"easy": [0], "hard": [], "junk": []}] * 2)
    with pytest.raises(ValueError, match="NaN"):
        revisitop_map(np.array([[np.nan, 1.0]]), [{"easy": [0], "hard": [], "junk": []}])


def test_features_path_matches_scores_path():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((11, 32)).astype(np.float32)
    db = rng.standard_normal((500, 32)).astype(np.float16)      # fp16 storage, as features.npy
    gnd = random_gnd(rng, 11, 500)
    scores = q @ db.astype(np.float32).T
    ours = revisitop_map_features(q, db, gnd, chunk=64)
    assert_same(ours, revisitop_reference(scores, gnd))
    items = pad_items([g["easy"] + g["hard"] for g in gnd], 500)
    np.testing.assert_array_equal(item_ranks_from_features(q, torch.from_numpy(db), items, chunk=100),
                                  item_ranks(scores, items))


def test_instre_map_is_reference_without_junk():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    db = rng.standard_normal((120, 16)).astype(np.float32)
    gnd = [{"ok": rng.choice(120, rng.integers(1, 9), replace=False).tolist()} for _ in range(7)]
    ours = instre_map(q, db, gnd, chunk=50)
    ref_map, ref_aps, ref_mpr, _ = compute_map(full_ranking(q @ db.T), [{"ok": g["ok"], "junk": []} for g in gnd],
                                               (1, 5, 10))
    assert abs(ours["map"] - ref_map) < 1e-9
    np.testing.assert_allclose(ours["aps"], ref_aps, atol=1e-9)


def test_topk_and_gldv2_map():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    db = np.round(rng.standard_normal((300, 8)), 1).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db[7] = db[250] = db[3]              # exact duplicates: ties must go to the lower index
    q[0] = db[3]
    s, i = topk_from_features(q, db, 20, chunk=64)
    expect = full_ranking(q @ db.T).T[:, :20]
    np.testing.assert_array_equal(i.numpy(), expect)
    assert i[0, :3].tolist() == [3, 7, 250]
    # mAP@k closed form: positives at 1-based ranks 1 and 3 of 2 positives -> (1 + 2/3) / 2
    top = np.array([[10, 11, 12, 13]])
    assert gldv2_map_at_k(top, [[10, 12]], k=4)[0] == pytest.approx((1 + 2 / 3) / 2)
    # more positives than k: divide by k; none retrieved -> 0; no positives -> NaN
    assert gldv2_map_at_k(top, [[10, 11, 50, 51, 52]], k=2)[0] == pytest.approx(1.0)
    assert gldv2_map_at_k(top, [[99]], k=4)[0] == 0.0
    assert np.isnan(gldv2_map_at_k(top, [[]], k=4)[0])
