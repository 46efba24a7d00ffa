"""insclr.mining against the loop reference in insclr/bench/reference_insclr.py (ALGORITHM §5, §7, §8)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from insclr.candidates import CandidatePool
from insclr.mining import (MemoryBankV1, MemoryBankV2, NoBank, Views, boundaries, parse_mode, select_candidates,
                           select_positives)
from insclr.bench.reference_insclr import (ReferenceBankV2, boundaries_loop, select_candidates_loop,
                                           select_positives_loop, v1_get_loop)

N, D, K_POOL, CLUSTER = 480, 16, 60, 24


@pytest.fixture(scope="module")
def pool():
    """Clustered features and their exact kNN pool: similarities cross 0.75 and 0.5 in every row."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(N // CLUSTER, D, generator=g)
    noise = (torch.rand(N, generator=g) + 0.3)[:, None] * torch.randn(N, D, generator=g) * 2 / D ** 0.5
    feats = F.normalize(centers.repeat_interleave(CLUSTER, 0) + noise, dim=1)
    sims = feats @ feats.T
    sims.fill_diagonal_(-2.0)
    top, nbr = sims.topk(K_POOL, dim=1)
    return feats, nbr.int().numpy(), top.half().numpy()


def _batch(pool, n_anchors=6, k=3, seed=1, reject=(4, 9)):
    """Indices and labels of one step in §4 order (anchors, then K neighbours each); `reject` rows negated."""
    _, nbr, _ = pool
    anchors = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:n_anchors]
    idx = torch.cat([anchors, torch.from_numpy(nbr[anchors.numpy(), :k]).long().flatten()])
    labels = torch.cat([anchors + 1, (anchors + 1).repeat_interleave(k)])
    for r in reject:
        labels[n_anchors + r] = -labels[n_anchors + r]
    return idx, labels


def _pool_of(pool):
    return CandidatePool.from_arrays(pool[1], pool[2])


def _bank(pool, mode, get_size=400, use_negative=True, filled=N):
    feats, nbr, sims = pool
    bank = MemoryBankV2(CandidatePool.from_arrays(nbr, sims), D, 0.75, 0.5, mode, get_size, use_negative)
    g = torch.Generator().manual_seed(2)
    aug = F.normalize(feats + 0.2 * torch.randn(N, D, generator=g), dim=1)
    bank.fill(torch.arange(filled), Views(aug[:filled], feats[:filled]))
    return bank


# --- §5 selection -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,thresh,always", [("fixed", 0.6, 0), ("dynamic", 0.9, 0), ("fixed", 0.95, 2),
                                                ("none", 0.6, 0)])
def test_select_positives_matches_loop(pool, mode, thresh, always):
    feats, nbr, _ = pool
    idx, labels = _batch(pool, reject=())
    b = 6
    ours = select_positives(feats[idx[:b]], feats[idx[b:]], labels, mode, thresh, always)
    theirs = select_positives_loop(feats[idx[:b]], feats[idx[b:]], labels, mode, thresh, always)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[:b], labels[:b])
    rejected = ours[b:] < 0
    assert torch.equal(ours[b:][rejected], -labels[:b].repeat_interleave(3)[rejected])
    if always:
        assert (ours[b:].view(b, 3)[:, :always] > 0).all()


def test_select_positives_closed_form():
    anchor = torch.tensor([[1.0, 0.0]])
    nbrs = torch.tensor([[0.8, 0.6], [0.5, 0.866], [0.0, 1.0]])
    labels = torch.tensor([7, 7, 7, 7])
    assert select_positives(anchor, nbrs, labels, "fixed", 0.6).tolist() == [7, 7, -7, -7]
    # dynamic: 0.5 / 0.8 = 0.625 >= 0.6 is kept
    assert select_positives(anchor, nbrs, labels, "dynamic", 0.6).tolist() == [7, 7, 7, -7]
    assert select_positives(anchor, nbrs, labels, "fixed", 0.6, always_true=2).tolist() == [7, 7, 7, -7]
    with pytest.raises(ValueError, match="selection mode 'soft'"):
        select_positives(anchor, nbrs, labels, "soft", 0.6)
    with pytest.raises(ValueError, match="labels"):
        select_positives(anchor, nbrs, labels[:3], "fixed", 0.6)


# --- boundaries -----------------------------------------------------------------------------------

def test_boundaries_match_original_loop(pool):
    _, _, sims = pool
    for thresh in (0.75, 0.5, 0.65, 0.95, 0.6001, 2.0, -3.0):   # exact and inexact in float16
        ours = boundaries(sims, thresh, chunk=100)
        assert ours.dtype == torch.long
        assert np.array_equal(ours.numpy(), boundaries_loop(sims, thresh))
    assert torch.equal(boundaries(torch.from_numpy(sims), 0.75), boundaries(sims, 0.75))


def test_boundaries_count_leading_entries_only():
    sims = torch.tensor([[0.9, 0.8, 0.3, 0.85], [0.2, 0.9, 0.9, 0.9], [0.8, 0.8, 0.8, 0.8]])
    assert boundaries(sims, 0.75).tolist() == [2, 0, 4]
    with pytest.raises(ValueError, match="N, k"):
        boundaries(torch.zeros(3), 0.5)


# --- mode grammar and traversal -------------------------------------------------------------------

def test_parse_mode_forms():
    m = parse_mode("b+i_tr4_avg0.60_k05")
    assert (m.init, m.iterations) == ("b+i", 4)
    assert m.scores == (("avg", 0.6),) * 4 and m.selects == (("k", 5),) * 4
    m = parse_mode("a+i_tr3_max0.50avg0.60_t0.70k10")
    assert m.scores == (("max", 0.5), ("avg", 0.6), ("avg", 0.6))
    assert m.selects == (("t", 0.7), ("k", 10), ("k", 10))
    assert parse_mode(m) is m


@pytest.mark.parametrize("mode,part", [
    ("b+i_tr4_avg0.60", "4 parts"),
    ("c+i_tr4_avg0.60_k05", "init part 'c+i'"),
    ("b+i_tr0_avg0.60_k05", "iteration part 'tr0'"),
    ("b+i_trx_avg0.60_k05", "iteration part 'trx'"),
    ("b+i_tr2_mean0.6_k05", "bad score entry at 'mean0.6'"),
    ("b+i_tr2_avg0.6_k05", "bad score entry"),
    ("b+i_tr2_avgx.yz_k05", "score threshold 'x.yz'"),
    ("b+i_tr2_avg0.60_k5", "bad select entry at 'k5'"),
    ("b+i_tr2_avg0.60_q05", "bad select entry at 'q05'"),
    ("b+i_tr2_avg0.60_ta.bc", "select threshold 'a.bc'"),
    ("b+i_tr1_avg0.60avg0.70_k05", "2 score entries but tr1"),
])
def test_parse_mode_errors_name_the_part(mode, part):
    with pytest.raises(ValueError, match=part.replace("+", r"\+")):
        parse_mode(mode)


MODES = ["b+i_tr4_avg0.60_k05", "b+i_tr2_avg0.60_k20", "a+i_tr2_max0.50avg0.60_t0.70k10",
         "b+0_tr3_avg0.55_t0.60", "a+i_tr1_max0.70_k03", "b+i_tr5_max0.60avg0.55max0.65_k02t0.62k04",
         "b+0_tr2_avg0.40_k00"]


@pytest.mark.parametrize("mode", MODES)
def test_select_candidates_matches_loop(pool, mode):
    feats = pool[0]
    g = torch.Generator().manual_seed(3)
    members, cands = feats[:4], feats[torch.randperm(N, generator=g)[:120]]
    init_pos, anchor_pos = feats[4:10], feats[5:8]
    ours = select_candidates(mode, members, cands, init_pos, anchor_pos)
    theirs = select_candidates_loop(mode, members, cands, init_pos, anchor_pos)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, ours.sort().values) and ours.dtype == torch.long
    empty = select_candidates(mode, members, cands[:0], init_pos, anchor_pos)
    assert empty.numel() == 0


def test_select_candidates_closed_form():
    # query e0; candidates: c0 = e0 (sim 1), c1 close to c0 but 0.5 from e0, c2 orthogonal
    q = torch.tensor([[1.0, 0.0, 0.0]])
    c = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.866, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    # iteration 1 selects c0 only (avg >= 0.9); iteration 2 scores c1 against {q, c0}: both 0.5
    assert select_candidates("b+0_tr1_avg0.90_k05", q, c, q[:0], q[:0]).tolist() == [0]
    assert select_candidates("b+0_tr2_avg0.90avg0.40_k05", q, c, q[:0], q[:0]).tolist() == [0, 1]
    assert select_candidates("b+0_tr2_avg0.90_t0.40", q, c, q[:0], q[:0]).tolist() == [0]


# --- memory bank v2 -------------------------------------------------------------------------------

def _compare_v2(bank, idx, labels, seed=5):
    ref = ReferenceBankV2.from_bank(bank)
    ours = bank.get(idx, labels, torch.Generator().manual_seed(seed))
    theirs = ref.get(idx, labels, torch.Generator().manual_seed(seed))
    assert torch.equal(ours.rows, theirs.rows)
    assert torch.equal(ours.labels, theirs.labels)
    assert torch.equal(ours.features, theirs.features)
    for key in ("positives", "init_positives", "selected", "init_negatives"):
        assert ours.stats[key] == theirs.stats[key], key
    return ours


@pytest.mark.parametrize("mode", MODES)
def test_bank_v2_matches_loop(pool, mode):
    bank = _bank(pool, mode)
    idx, labels = _batch(pool)
    got = _compare_v2(bank, idx, labels)
    feats, row_labels, stats, rows = got.features, got.labels, got.stats, got.rows
    assert stats["init_positives"] > 0 and stats["candidates"] > 0 and stats["sampled"] > 0
    assert stats["size"] == min(400, N) == len(feats)
    positives = rows[row_labels <= N]
    assert set(row_labels[row_labels <= N].tolist()) <= set(labels[labels > 0].tolist())
    assert not set(positives.tolist()) & set(rows[row_labels == N + 1].tolist())
    assert len(set(rows.tolist())) == len(rows)


def test_bank_v2_selects_some_candidates(pool):
    bank = _bank(pool, "b+i_tr4_avg0.60_k05")
    assert bank.get(*_batch(pool)).stats["selected"] > 0


@pytest.mark.parametrize("use_negative,get_size,filled", [(False, 400, N), (True, 50, N), (True, 10_000, N),
                                                          (True, 400, N // 2)])
def test_bank_v2_fill_and_negative_switches(pool, use_negative, get_size, filled):
    bank = _bank(pool, "b+i_tr2_avg0.60_k05t0.70", get_size, use_negative, filled)
    idx, labels = _batch(pool, n_anchors=8, seed=7)
    got = _compare_v2(bank, idx, labels)
    row_labels, stats = got.labels, got.stats
    if not use_negative:
        assert stats["negatives"] == 0 and (row_labels <= N).all()
    if get_size == 10_000:      # every image is returned, as a positive or a negative
        assert stats["size"] == N
    if filled < N:              # negatives and fill come only from images with counter >= 1
        negatives = got.rows[row_labels == N + 1]
        assert (bank.counter[negatives] >= 1).all()


def test_bank_v2_first_group_keeps_a_shared_index():
    # two anchors (0 and 1) with the same positive neighbour 2; group of row 0 comes first
    nbr = np.array([[2, 3, 4], [2, 4, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2]], dtype=np.int32)
    sims = np.array([[0.9, 0.1, 0.0]] * 5, dtype=np.float16)
    bank = MemoryBankV2(CandidatePool.from_arrays(nbr, sims), 4, 0.75, 0.5, "b+i_tr1_avg0.60_k05", 10)
    bank.fill(torch.arange(5), Views(torch.eye(5, 4), torch.eye(5, 4)))
    for first, second in ((1, 0), (0, 1)):
        got = bank.get(torch.tensor([first, second]), torch.tensor([first + 1, second + 1]))
        assert got.rows[0].item() == 2 and got.labels[0].item() == first + 1


def test_bank_v2_errors_and_state_dict(pool):
    feats, nbr, sims = pool
    whole = CandidatePool.from_arrays(nbr, sims)
    with pytest.raises(ValueError, match="positive_thresh"):
        MemoryBankV2(whole, D, 0.4, 0.5, MODES[0], 10)
    with pytest.raises(ValueError, match="init part"):
        MemoryBankV2(whole, D, 0.75, 0.5, "x+i_tr1_avg0.60_k05", 10)
    bank = _bank(pool, MODES[0])
    bank.update(torch.tensor([3, 3, 5]), Views(feats[:3], feats[:3]))
    # one increment per update call, even for an index twice in the step (as the original)
    assert bank.counter[[3, 5, 6]].tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="indices must lie"):
        bank.fill(torch.tensor([N]), Views(feats[:1], feats[:1]))
    with pytest.raises(IndexError):  # update reads no range from the device; the indexing still refuses
        bank.update(torch.tensor([N]), Views(feats[:1], feats[:1]))
    with pytest.raises(ValueError, match="do not match"):
        bank.update(torch.tensor([1, 2]), Views(feats[:1], feats[:1]))
    with pytest.raises(ValueError, match="noaug.enabled=true"):
        bank.update(torch.tensor([1]), Views(feats[:1]))
    other = MemoryBankV2(whole, D, 0.75, 0.5, MODES[0], 400)
    other.load_state_dict(bank.state_dict())
    for name in ("bank", "bank_noaug", "counter"):
        assert torch.equal(getattr(other, name), getattr(bank, name))
    idx, labels = _batch(pool)
    a = bank.get(idx, labels, torch.Generator().manual_seed(1))
    b = other.get(idx, labels, torch.Generator().manual_seed(1))
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    with pytest.raises(KeyError, match="bank_noaug"):
        other.load_state_dict({"bank": bank.bank, "counter": bank.counter})
    small = MemoryBankV2(CandidatePool.from_arrays(nbr[:10] % 10, sims[:10]), D, 0.75, 0.5, MODES[0], 4)
    with pytest.raises(ValueError, match="shape"):
        small.load_state_dict(bank.state_dict())


# --- memory bank v1 -------------------------------------------------------------------------------

def test_bank_v1_exclusions_and_loop(pool):
    feats, nbr, _ = pool
    bank = MemoryBankV1(_pool_of(pool), D, potential_positive=10, get_size=200)
    bank.update(torch.arange(N - 40), Views(feats[:N - 40]))
    idx, labels = _batch(pool)
    excluded = set(nbr[idx.numpy(), :10].flatten().tolist()) | set(idx.tolist()) | set(range(N - 40, N))
    for seed in range(4):
        got = bank.get(idx, labels, torch.Generator().manual_seed(seed))
        drawn = got.rows
        assert not set(drawn.tolist()) & excluded
        assert len(set(drawn.tolist())) == len(drawn) == 200 == got.stats["negatives"]
        assert (got.labels == N + 1).all() and torch.equal(got.features, bank.bank[drawn])
        assert torch.equal(drawn, v1_get_loop(bank, idx, torch.Generator().manual_seed(seed)))
    bank.get_size = 10_000        # fewer candidates than get_size: all of them, none excluded
    assert len(bank.get(idx, labels).rows) == N - len(excluded) == bank.get(idx).stats["candidates"]


def test_bank_v1_without_row_exclusion_is_the_originals_rule(pool):
    """memory.exclude_rows=false: only the potential positives are excluded, as in the original's
    XBMv1.get (setdiff of the updated rows and the rows' first potential_positive neighbours)."""
    feats, nbr, _ = pool
    bank = MemoryBankV1(_pool_of(pool), D, potential_positive=10, get_size=200, exclude_rows=False)
    bank.update(torch.arange(N - 40), Views(feats[:N - 40]))
    idx, _ = _batch(pool)
    original = np.setdiff1d(np.arange(N - 40), np.unique(nbr[idx.numpy(), :10]))
    assert bank.candidates(idx).tolist() == original.tolist()
    assert set(idx.tolist()) & set(original.tolist())  # the step's own images may be drawn


def test_bank_v1_state_dict_and_fill(pool):
    feats, nbr, _ = pool
    bank = MemoryBankV1(_pool_of(pool), D, 5, 50)
    bank.fill(torch.arange(N), Views(feats))
    bank.update(torch.arange(3), Views(feats[:3]))
    other = MemoryBankV1(_pool_of(pool), D, 5, 50)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.bank, bank.bank) and torch.equal(other.counter, bank.counter)
    assert bank.counter[:4].tolist() == [2, 2, 2, 1]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_restore_undoes_an_update_bit_for_bit(pool, version):
    feats, nbr, _ = pool
    bank = _bank(pool, MODES[0], filled=N // 2) if version == "v2" else MemoryBankV1(_pool_of(pool), D, 5, 50)
    if version == "v1":
        bank.update(torch.arange(0, N, 3), Views(feats[::3]))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    # an index twice, rows never written (counter 0) and rows written before
    idx = torch.tensor([5, 5, N - 1, 0, 7, 6])
    new = torch.full((len(idx), D), float("nan"))
    overwritten = bank.update(idx, Views(new, new))
    assert bank.counter[[5, N - 1]].tolist() == [before["counter"][5] + 1, before["counter"][N - 1] + 1]
    bank.restore(overwritten)
    after = bank.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # NaN rows gone: equal, not allclose


def test_no_bank_answers_the_same_calls(pool):
    feats = pool[0]
    bank = NoBank()
    bank.restore(bank.update(torch.arange(3), Views(feats[:3])))
    bank.fill(torch.arange(3), Views(feats[:3], feats[:3]))
    assert bank.get(torch.arange(3), torch.arange(3) + 1) is None and not bank.needs_fill
    bank.load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="memory.version=none"):
        bank.load_state_dict(MemoryBankV1(_pool_of(pool), D, 5, 50).state_dict())


def test_bank_get_buffer_reuse_is_detected_by_autograd(pool):
    feats, nbr, _ = pool
    bank = MemoryBankV1(_pool_of(pool), D, 5, 50)
    bank.fill(torch.arange(N), Views(feats))
    idx, labels = _batch(pool)
    x = feats[idx].clone().requires_grad_()
    from insclr.loss import contrastive_loss

    got = bank.get(idx, labels, torch.Generator().manual_seed(0))
    loss, _ = contrastive_loss(x, labels, got.features, got.labels, -1.0, memory=True)
    bank.get(idx, labels, torch.Generator().manual_seed(1))        # overwrites the rows in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bank_v2_no_kept_rows_gives_only_negatives(pool):
    bank = _bank(pool, MODES[0], get_size=30)
    idx, labels = _batch(pool)
    got = _compare_v2(bank, idx, -labels.abs())
    assert got.stats["groups"] == 0 and got.stats["positives"] == 0 and (got.labels == N + 1).all()
    assert len(got.features) == 30


def test_mining_benchmark_runs_small():
    from insclr.bench.mining import boundaries_setup, run

    fig = run(n=1200, dim=32, get_size=300, anchors=4, k=3, repeats=1, pool_k=60)
    assert fig["rows_identical"] and fig["ratio"] > 0 and fig["positives"] > 0
    # the same rows (identical), float32 sums of at most 16 rows × 300 memory rows in another order
    assert fig["loss_ours"] == pytest.approx(fig["loss_reference"], rel=16 * 300 * torch.finfo(torch.float32).eps / 2)
    assert set(fig["parts"]) == {"mining", "get"}
    assert fig["floor_s"] > 0 and fig["ratio_bound"] == pytest.approx(fig["reference_step_s"] / fig["floor_s"])
    assert boundaries_setup(n=400, pool_k=60)["ratio"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_bank_v2_on_cuda_mines_what_the_loop_mines(pool, mode):
    """On a GPU the bank is bfloat16 and the fill draw uses a CUDA generator: the pseudo-positives
    (rows, labels, in order) equal the loop's on the same (rounded) features; the negatives are a
    draw of the same size from the same candidates."""
    feats, nbr, sims = pool
    bank = MemoryBankV2(CandidatePool.from_arrays(nbr, sims), D, 0.75, 0.5, mode, 400, device="cuda")
    assert bank.bank.dtype == torch.bfloat16 and bank.bank.is_cuda
    aug = F.normalize(feats + 0.2 * torch.randn(N, D, generator=torch.Generator().manual_seed(2)), dim=1)
    bank.fill(torch.arange(N), Views(aug, feats))
    idx, labels = _batch(pool)
    ref = ReferenceBankV2.from_bank(bank)
    got = bank.get(idx.cuda(), labels.cuda(), torch.Generator("cuda").manual_seed(5))
    theirs = ref.get(idx, labels, torch.Generator().manual_seed(5))
    rows, got_labels, ref_labels = got.rows.cpu(), got.labels.cpu(), theirs.labels
    pos, ref_pos = got_labels <= N, ref_labels <= N
    assert torch.equal(rows[pos], theirs.rows[ref_pos]) and torch.equal(got_labels[pos], ref_labels[ref_pos])
    for key in ("positives", "init_positives", "selected", "init_negatives"):
        assert got.stats[key] == theirs.stats[key], key
    assert len(rows) == len(theirs.rows) == len(set(rows.tolist()))
    assert torch.equal(got.features.cpu(), bank.bank.cpu()[rows])
