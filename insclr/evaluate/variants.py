"""Evaluation of the same features after whitening, re-ranking or PCA (docs/rerank.md).

`variants(es, queries, database, device, whitening, steps, pca_dims)` -> {label: metrics} with
the same keys as the plain metrics, in this order:
  - "whiten"                      the features through `--whiten W.npz` (re-normalised);
  - "whiten+dba", "…+aqe", …      after each `--rerank` step in turn, on the (whitened) features;
  - "pca128", …                   the original InsCLR INSTRE protocol on the plain features: PCA
                                  with whitening fitted on the database, no re-normalisation.
A PCA size the database cannot support (more than N − 1 dimensions) is left out with a reason in
the returned `skipped` dict.
"""

import numpy as np
import torch

from insclr.evaluate.metrics import item_ranks, map_from_ranks, pad_items, revisitop_map


def score_matrix(es, scores):
    """Metrics of evaluation set `es` from a score matrix [Q, N] (the diffusion's output);
    the same keys as `insclr.evaluate.core.score`'s summary."""
    from insclr.evaluate.core import _jsonable

    if es.kind == "revisitop":
        r = revisitop_map(scores, es.gnd)
        return {k: _jsonable(r[k]) for k in ("mapE", "mapM", "mapH", "mprE", "mprM", "mprH", "kappas",
                                              "apsE", "apsM", "apsH")}
    if es.kind == "instre":
        positives = [np.asarray(g["ok"], dtype=np.int64).reshape(-1) for g in es.gnd]
        items = pad_items(positives, scores.shape[1], scores.device)
        r = map_from_ranks(item_ranks(scores, items), items, positives, [[]] * len(positives))
        return {"map": r["map"], "aps": _jsonable(r["aps"])}
    k = min(100, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]   # ties: lower index
    from insclr.evaluate.core import gldv2_summary

    return gldv2_summary(es, order.cpu().numpy())[0]


def pca_protocol(queries, database, dim):
    """The original's INSTRE evaluation features: PCA-whitening to `dim` fitted on the database,
    applied to both sides, not re-normalised -> (queries, database) float32 numpy."""
    from insclr.whiten import pca_whitening

    mean, projection = pca_whitening(database, dim)
    mean, projection = mean.float().numpy(), projection.float().numpy()

    def apply(x):
        return np.concatenate([(np.asarray(x[s:s + 65536], np.float32) - mean) @ projection.T
                               for s in range(0, len(x), 65536)])
    return apply(queries), apply(database)


def variants(es, queries, database, device, whitening=None, steps=(), pca_dims=()):
    """{label: metrics} of the variants asked for (see the module docstring), and {label: reason}
    of those skipped."""
    from insclr.evaluate.core import score
    from insclr.rerank import apply_steps
    from insclr.whiten import apply_whitening

    out, skipped = {}, {}
    q, db, prefix = queries, database, ""
    if whitening is not None:
        q, db = apply_whitening(queries, whitening), apply_whitening(database, whitening)
        prefix = "whiten"
        out[prefix] = score(es, q, db, device)[0]
    for label, sq, sdb, scores in apply_steps(q, db, steps, device):
        label = f"{prefix}+{label}" if prefix else label
        out[label] = score(es, sq, sdb, device)[0] if scores is None else score_matrix(es, scores)
    for dim in pca_dims:
        if not dim < len(database):
            skipped[f"pca{dim}"] = (f"PCA to {dim} dims needs more than {dim} database images, "
                                    f"the set has {len(database)}")
            continue
        if dim > database.shape[1]:
            skipped[f"pca{dim}"] = f"PCA to {dim} dims of {database.shape[1]}-d features"
            continue
        out[f"pca{dim}"] = score(es, *pca_protocol(queries, database, dim), device)[0]
    return out, skipped


def rows_with_variants(results, table_rows):
    """`table_rows(results)` with, after each set's row, a row per variant ("roxford5k +dba+aqe")."""
    rows = []
    for name, r in results.items():
        rows += table_rows({name: r})
        for label, v in r.get("variants", {}).items():
            rows += [dict(row, dataset=f"{name} +{label}") for row in table_rows({name: v})]
    return rows


def parse_pca(text):
    """'128,256,512' -> (128, 256, 512)."""
    try:
        dims = tuple(int(d) for d in text.split(",") if d)
    except ValueError:
        raise ValueError(f"--pca {text!r}: expected comma-separated dimensions, e.g. 128,256,512") from None
    if not dims or min(dims) < 1:
        raise ValueError(f"--pca {text!r}: every dimension must be a positive integer")
    return dims
