"""A straightforward revisitop evaluation, kept as the reference for insclr.evaluate.metrics.

It follows the published revisitop protocol (compute_ap / compute_map of the revisitop
evaluation code): rank the whole database of every query with a full argsort, find the
positions of the positive and junk images in that ranking, shift each positive up by the
number of junk images ranked before it, then sum the trapezoids of the precision/recall
curve; mP@k uses k clipped to the last positive's position. Queries without positives get
NaN and are left out of the means.

`kind` is the argsort algorithm: "stable" breaks score ties by database index, the
definition insclr uses; the original code's default quicksort leaves ties in arbitrary order.
"""

import numpy as np


def full_ranking(scores, kind="stable"):
    """scores [Q, N] -> ranks [N, Q]: column q lists database indices by descending score."""
    return np.argsort(-np.asarray(scores, dtype=np.float64).T, axis=0, kind=kind)


def compute_ap(ranks, nres):
    """AP from the (junk-shifted, 0-based, ascending) positions of the positives; nres = #positives."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j in range(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def compute_map(ranks, gnd, kappas=()):
    """ranks [N, Q] (full ranking per query), gnd: list of {'ok': [...], 'junk': [...]}."""
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    total, nempty = 0.0, 0
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"], dtype=np.int64)
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", []), dtype=np.int64)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = compute_ap(pos, len(qgnd))
        total += ap
        aps[i] = ap
        pos = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(max(pos), kappa)
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    denom = nq - nempty
    if denom == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return total / denom, aps, pr / denom, prs


def revisitop_reference(scores, gnd, kappas=(1, 5, 10), kind="stable"):
    """The Easy / Medium / Hard evaluation of revisited Oxford/Paris from a [Q, N] score matrix."""
    ranks = full_ranking(scores, kind)
    setups = {
        "E": [{"ok": list(g["easy"]), "junk": list(g["junk"]) + list(g["hard"])} for g in gnd],
        "M": [{"ok": list(g["easy"]) + list(g["hard"]), "junk": list(g["junk"])} for g in gnd],
        "H": [{"ok": list(g["hard"]), "junk": list(g["junk"]) + list(g["easy"])} for g in gnd],
    }
    out = {}
    for name, g in setups.items():
        m, aps, mpr, prs = compute_map(ranks, g, kappas)
        out["map" + name], out["aps" + name], out["mpr" + name], out["prs" + name] = m, aps, mpr, prs
    return out
