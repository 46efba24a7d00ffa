"""Straightforward loop implementations of αQE, DBA, diffusion and the two whitenings (numpy,
float64, full sorts and dense solves) that tests/test_rerank.py checks insclr.rerank / insclr.whiten
against."""

import numpy as np


def _order(scores):
    # descending score, ties to the lower index (the rule of insclr.evaluate.metrics)
    return np.lexsort((np.arange(len(scores)), -scores))


def expand(x, database, neighbors, alpha):
    out = x.copy()
    for j in neighbors:
        out += max(float(x @ database[j]), 0.0) ** alpha * database[j]
    return out / np.linalg.norm(out)


def aqe(queries, database, k, alpha):
    return np.stack([expand(q, database, _order(database @ q)[:k], alpha) for q in queries])


def dba(database, k, alpha):
    out = []
    for i, d in enumerate(database):
        order = [j for j in _order(database @ d) if j != i][:k]
        out.append(expand(d, database, order, alpha))
    return np.stack(out)


def diffusion(queries, database, k, query_k, gamma, alpha, truncate):
    n = len(database)
    sims = database @ database.T
    knn = [set([j for j in _order(sims[i]) if j != i][:k]) for i in range(n)]
    scores = []
    for q in queries:
        s = database @ q
        top = _order(s)[:truncate]
        a = np.zeros((len(top), len(top)))
        for u, i in enumerate(top):
            for v, j in enumerate(top):
                if j in knn[i] and i in knn[j]:
                    a[u, v] = max(sims[i, j], 0.0) ** gamma
        deg = a.sum(1)
        inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
        norm = inv[:, None] * a * inv[None, :]
        y = np.zeros(len(top))
        y[:query_k] = np.maximum(s[top[:query_k]], 0) ** gamma
        f = np.linalg.solve(np.eye(len(top)) - alpha * norm, y)
        row = s.copy()
        row[top] = np.where(f > 0, 3 + f, s[top])
        scores.append(row)
    return np.stack(scores)


def pca_whiten(x, dim):
    mean = x.mean(0)
    u, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = sv ** 2 / (len(x) - 1)                                # sklearn's explained_variance_
    return mean, vt[:dim] / np.sqrt(var[:dim])[:, None]


def learned_whiten(x, pairs, shrink):
    mean = x[np.unique(pairs)].mean(0)
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    cs = diff.T @ diff / len(pairs)
    cs = (1 - shrink) * cs + shrink * np.trace(cs) / x.shape[1] * np.eye(x.shape[1])
    w, v = np.linalg.eigh(cs)
    p = v @ np.diag(w ** -0.5) @ v.T
    z = (x - mean) @ p
    w2, v2 = np.linalg.eigh(z.T @ z / len(x))
    return mean, v2[:, ::-1].T @ p


def mutual_pairs(neighbors, similarities, k, thresh):
    out = []
    for i in range(len(neighbors)):
        for j, s in zip(neighbors[i][:k], similarities[i][:k]):
            back = list(neighbors[j][:k])
            if i < j and s >= thresh and i in back and similarities[j][back.index(i)] >= thresh:
                out.append((i, int(j)))
    return np.array(sorted(set(out)), dtype=np.int64).reshape(-1, 2)
