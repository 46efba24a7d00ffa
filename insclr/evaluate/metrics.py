"""Retrieval metrics without sorting database rows.

Average precision only needs the rank of each positive (and junk) image, and the rank of an
image is the number of database images that score above it. We count those in chunks of
database columns on the scores' device (`item_ranks`), so memory stays bounded for a 1M-image
database and nothing of size N is ever sorted. The AP and mP@k formulas are the revisitop
reference's (tests/reference_revisitop.py checks them to 1e-9).

Ties: the ranking is by descending score, ties broken by ascending database index, i.e. what
`np.argsort(-scores, kind="stable")` gives. The rank of database image m for a query is
`#{j : s_j > s_m} + #{j < m : s_j == s_m}`.
"""

import numpy as np
import torch

KAPPAS = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 24   # query × column scores per chunk: 64 MB of fp32 plus the counting temporaries


def _tensor(x, device=None, dtype=None):
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        x = torch.from_numpy(x if x.flags.writeable else np.array(x))   # memmapped features are read-only
    t = x
    return t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)


def _chunk_columns(num_queries, chunk=None):
    return int(chunk) if chunk else max(1024, CHUNK_ELEMENTS // max(num_queries, 1))


def pad_items(lists, num_db, device="cpu", what="ground truth"):
    """Ragged per-query index lists -> int64 [Q, M] padded with -1 (duplicates removed, order kept)."""
    rows = []
    for q, items in enumerate(lists):
        a = np.asarray(items, dtype=np.int64).reshape(-1)
        if a.size and (a.min() < 0 or a.max() >= num_db):
            raise ValueError(f"{what}: query {q} names database index {int(a.min() if a.min() < 0 else a.max())}"
                             f" outside [0, {num_db})")
        _, first = np.unique(a, return_index=True)
        rows.append(a[np.sort(first)])
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for q, r in enumerate(rows):
        out[q, :len(r)] = r
    return torch.from_numpy(out).to(device)


def _count_ranks(score_chunks, item_scores, items):
    """Rank of every item among all database columns (ties by index).

    score_chunks: iterable of (c0, S) with S [Q, C] the scores of database columns c0..c0+C-1.
    item_scores: [Q, M] the scores of the items (padding: +inf). items: int64 [Q, M] (padding: -1).
    Returns int64 [Q, M] ranks (0 = first); padding entries are meaningless.
    """
    q, m = items.shape
    t_sorted, order = torch.sort(item_scores, dim=1, stable=True)
    idx_sorted = torch.gather(items, 1, order)
    # hist[q, v] = number of database columns with exactly v items scoring strictly below them;
    # such a column is above exactly the items at sorted positions 0 .. v-1.
    hist = torch.zeros(q, m + 1, dtype=torch.int64, device=items.device)
    ties = torch.zeros(q, m, dtype=torch.int64, device=items.device)
    for c0, scores in score_chunks:
        if torch.isnan(scores).any():
            raise ValueError(f"NaN scores in database columns {c0}..{c0 + scores.shape[1] - 1}")
        left = torch.searchsorted(t_sorted, scores.contiguous())
        hist.scatter_add_(1, left, torch.ones_like(left))
        _add_ties(ties, t_sorted, scores, left, idx_sorted, c0)
    above = hist.flip(1).cumsum(1).flip(1)[:, 1:]      # above[m] = sum_{v > m} hist[v]
    ranks_sorted = above + ties
    return torch.empty_like(ranks_sorted).scatter_(1, order, ranks_sorted)


def _add_ties(ties, t_sorted, scores, left, idx_sorted, c0):
    """Count equal-score columns that come first by index.

    A column j ties some item iff the first item not below it (sorted position left_j) has
    exactly its score; that check is a gather, and the (rare) tied columns alone get a second
    search for the end of their run of equal items.
    """
    m = t_sorted.shape[1]
    first = torch.gather(t_sorted, 1, left.clamp(max=m - 1))
    qi, ji = torch.nonzero((left < m) & (first == scores), as_tuple=True)
    for b in range(0, qi.numel(), 4096):     # batches bound memory when nearly everything ties
        _add_tie_batch(ties, t_sorted, scores, left, idx_sorted, c0, qi[b:b + 4096], ji[b:b + 4096])


def _add_tie_batch(ties, t_sorted, scores, left, idx_sorted, c0, qi, ji):
    lo = left[qi, ji]
    hi = torch.searchsorted(t_sorted[qi], scores[qi, ji][:, None], right=True)[:, 0]
    width = hi - lo
    qi, ji, lo = (torch.repeat_interleave(x, width) for x in (qi, ji, lo))
    start = torch.cumsum(width, 0) - width
    pos = lo + torch.arange(qi.numel(), device=qi.device) - torch.repeat_interleave(start, width)
    before = (ji + c0) < idx_sorted[qi, pos]
    ties.index_put_((qi[before], pos[before]), torch.ones_like(qi[before]), accumulate=True)


def item_ranks(scores, items, chunk=None):
    """Ranks of `items` (int64 [Q, M], -1 padding) in each row of `scores` [Q, N] -> int64 [Q, M].

    Runs on `scores`' device; only [Q, chunk] of it is processed at a time.
    """
    scores = _tensor(scores)
    items = items.to(scores.device)
    safe = items.clamp(min=0)
    t = torch.gather(scores, 1, safe).masked_fill(items < 0, float("inf"))
    cols = _chunk_columns(scores.shape[0], chunk)
    chunks = ((c0, scores[:, c0:c0 + cols]) for c0 in range(0, scores.shape[1], cols))
    return _count_ranks(chunks, t, items)


def _rows(database, index, device):
    """database[index] as fp32 on `device` (database: numpy array/memmap or tensor)."""
    if isinstance(database, torch.Tensor):
        return database[index.to(database.device)].to(device, torch.float32)
    return _tensor(database[index.cpu().numpy()], device, torch.float32)


def _matmul_chunks(queries, database, cols, device):
    for c0 in range(0, database.shape[0], cols):
        block = _tensor(database[c0:c0 + cols], device, torch.float32)
        yield c0, queries @ block.T


def item_ranks_from_features(queries, database, items, chunk=None, device=None):
    """Like `item_ranks` with scores = queries [Q, D] · database [N, D]ᵀ computed chunk by chunk.

    `database` may be a numpy array or memmap (fp16 is fine): it is moved to `device` in chunks.
    Each item's score is computed once and written into its own column, so an item is always
    compared with itself consistently.
    """
    device = torch.device(device) if device is not None else _tensor(queries).device
    queries = _tensor(queries, device, torch.float32)
    items = items.to(device)
    valid = items >= 0
    uniq, inverse = torch.unique(items[valid], return_inverse=True)
    uniq_scores = torch.cat([queries @ _rows(database, uniq[i:i + 16384], device).T
                             for i in range(0, uniq.numel(), 16384)]
                            or [torch.zeros(queries.shape[0], 0, device=device)], 1)
    t = torch.full(items.shape, float("inf"), device=device)
    rows = torch.nonzero(valid, as_tuple=True)[0]
    t[valid] = uniq_scores[rows, inverse]
    cols = _chunk_columns(queries.shape[0], chunk)

    def consistent(chunks):
        for c0, s in chunks:
            inside = valid & (items >= c0) & (items < c0 + s.shape[1])
            qi, mi = torch.nonzero(inside, as_tuple=True)
            s[qi, items[qi, mi] - c0] = t[qi, mi]
            yield c0, s

    return _count_ranks(consistent(_matmul_chunks(queries, database, cols, device)), t, items)


def average_precision(pos_ranks, junk_ranks, kappas=KAPPAS):
    """Revisitop AP and precision@k of one query.

    pos_ranks, junk_ranks: int arrays of 0-based ranks in the full ranking (distinct values, any
    order). Junk images are taken out of the ranking first. Returns (ap, prs [len(kappas)]);
    (nan, nan…) when there are no positives.
    """
    pos = np.sort(np.asarray(pos_ranks, dtype=np.int64))
    if pos.size == 0:
        return float("nan"), np.full(len(kappas), np.nan)
    junk = np.sort(np.asarray(junk_ranks, dtype=np.int64))
    pos = pos - np.searchsorted(junk, pos, side="left")     # junk images ranked strictly before
    j = np.arange(pos.size, dtype=np.float64)
    prec0 = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
    prec1 = (j + 1) / (pos + 1)
    ap = float(np.sum((prec0 + prec1) / 2.0) / pos.size)
    one_based = pos + 1
    prs = np.array([(one_based <= min(one_based.max(), k)).sum() / min(one_based.max(), k) for k in kappas],
                   dtype=np.float64)
    return ap, prs


def _mean(values):
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values).any(axis=tuple(range(1, values.ndim))) if values.ndim > 1 else ~np.isnan(values)
    return values[keep].mean(axis=0) if keep.any() else np.full(values.shape[1:], np.nan)


def map_from_ranks(ranks, items, positives, junk, kappas=KAPPAS):
    """mAP, mP@k and per-query AP from item ranks.

    ranks, items: int64 [Q, M] from `item_ranks` (items padded with -1). positives, junk: per
    query index lists (subsets of that query's items). Queries without positives are NaN and
    left out of the means. Returns dict(map, mpr [K], aps [Q], prs [Q, K]).
    """
    ranks, items = ranks.cpu().numpy(), items.cpu().numpy()
    aps, prs = np.empty(len(positives)), np.empty((len(positives), len(kappas)))
    for q in range(len(positives)):
        lookup = dict(zip(items[q][items[q] >= 0].tolist(), ranks[q][items[q] >= 0].tolist()))
        p = [lookup[i] for i in dict.fromkeys(np.asarray(positives[q], dtype=np.int64).tolist())]
        jk = [lookup[i] for i in dict.fromkeys(np.asarray(junk[q], dtype=np.int64).tolist())]
        aps[q], prs[q] = average_precision(p, jk, kappas)
    return {"map": float(_mean(aps)), "mpr": _mean(prs), "aps": aps, "prs": prs}


def _revisitop_setups(gnd):
    def cat(*keys):
        return [np.concatenate([np.asarray(g.get(k, []), dtype=np.int64).reshape(-1) for k in keys]) for g in gnd]
    return {"E": (cat("easy"), cat("junk", "hard")),
            "M": (cat("easy", "hard"), cat("junk")),
            "H": (cat("hard"), cat("junk", "easy"))}


def _revisitop_from_ranks(ranks, items, setups, kappas):
    out = {"kappas": list(kappas)}
    for name, (pos, junk) in setups.items():
        r = map_from_ranks(ranks, items, pos, junk, kappas)
        out["map" + name], out["mpr" + name], out["aps" + name], out["prs" + name] = \
            r["map"], r["mpr"], r["aps"], r["prs"]
    return out


def revisitop_map(scores, gnd, kappas=KAPPAS, chunk=None):
    """Revisited Oxford/Paris evaluation of a score matrix.

    scores: [Q, N] numpy array or torch tensor (computed on its device). gnd: Q dicts with
    'easy', 'hard', 'junk' (0-based database indices). Returns mapE/mapM/mapH (fractions),
    mprE/mprM/mprH (np [len(kappas)]), apsE/apsM/apsH (np [Q], NaN for queries without
    positives), prsE/M/H [Q, K] and 'kappas'.
    """
    scores = _tensor(scores)
    if scores.ndim != 2 or scores.shape[0] != len(gnd):
        raise ValueError(f"scores must be [queries={len(gnd)}, database], got {tuple(scores.shape)}")
    setups = _revisitop_setups(gnd)
    items = pad_items([np.concatenate(x) for x in zip(*setups["M"])], scores.shape[1], scores.device)
    return _revisitop_from_ranks(item_ranks(scores, items, chunk), items, setups, kappas)


def revisitop_map_features(queries, database, gnd, kappas=KAPPAS, chunk=None, device=None):
    """`revisitop_map` of queries [Q, D] · database [N, D]ᵀ, scored chunk by chunk (for +R-1M)."""
    setups = _revisitop_setups(gnd)
    items = pad_items([np.concatenate(x) for x in zip(*setups["M"])], database.shape[0])
    ranks = item_ranks_from_features(queries, database, items, chunk, device)
    return _revisitop_from_ranks(ranks, items, setups, kappas)


def instre_map(queries, database, gnd, kappas=KAPPAS, chunk=None, device=None):
    """INSTRE mAP (no junk): gnd = Q dicts with 'ok'. Returns dict(map, mpr, aps, prs)."""
    positives = [np.asarray(g["ok"], dtype=np.int64).reshape(-1) for g in gnd]
    items = pad_items(positives, database.shape[0])
    ranks = item_ranks_from_features(queries, database, items, chunk, device)
    return map_from_ranks(ranks, items, positives, [[]] * len(positives), kappas)


def topk_from_features(queries, database, k, chunk=None, device=None):
    """Top-k database indices per query by descending dot product, chunk by chunk.

    Returns (scores float32 [Q, k'], indices int64 [Q, k']) with k' = min(k, N), on `device`.
    """
    device = torch.device(device) if device is not None else _tensor(queries).device
    queries = _tensor(queries, device, torch.float32)
    k = min(int(k), database.shape[0])
    best_s = torch.empty(queries.shape[0], 0, device=device)
    best_i = torch.empty(queries.shape[0], 0, dtype=torch.int64, device=device)
    for c0, s in _matmul_chunks(queries, database, _chunk_columns(queries.shape[0], chunk), device):
        idx = torch.arange(c0, c0 + s.shape[1], device=device).expand(s.shape[0], -1)
        best_s, best_i = _keep_top(torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1), k)
    order = torch.sort(best_s, dim=1, descending=True, stable=True).indices
    best_s, best_i = torch.gather(best_s, 1, order), torch.gather(best_i, 1, order)
    return best_s, best_i


def _keep_top(scores, indices, k):
    """The k best columns of each row, ties at the k-th score going to the lower index.

    Columns are in ascending index order and stay so (the final stable sort by score then
    orders ties by index, the same rule as the ranks above).
    """
    k = min(k, scores.shape[1])
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above, equal = scores > kth, scores == kth
    need = k - above.sum(1, keepdim=True)
    keep = above | (equal & (equal.cumsum(1) <= need))
    cols = torch.nonzero(keep, as_tuple=True)[1].view(scores.shape[0], k)
    return torch.gather(scores, 1, cols), torch.gather(indices, 1, cols)


def gldv2_map_at_k(top_indices, positives, k=100):
    """GLDv2 retrieval mAP@k (the Kaggle metric) per query.

    top_indices: int [Q, >=k] ranked database indices; positives: Q index lists. AP@k(q) =
    Σ_{i≤k} P(i)·rel(i) / min(|positives_q|, k); NaN for queries without positives.
    Returns np [Q].
    """
    top = np.asarray(top_indices)[:, :k]
    aps = np.full(len(positives), np.nan)
    for q, pos in enumerate(positives):
        pos = set(np.asarray(pos, dtype=np.int64).reshape(-1).tolist())
        if not pos:
            continue
        rel = np.fromiter((i in pos for i in top[q].tolist()), dtype=np.float64, count=top.shape[1])
        precision = np.cumsum(rel) / np.arange(1, rel.size + 1)
        aps[q] = float((precision * rel).sum() / min(len(pos), k))
    return aps
