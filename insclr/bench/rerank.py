"""Benchmark: αQE + DBA and diffusion re-ranking, ours (insclr.rerank, chunked torch) against a
plain numpy implementation of the same formulas.

`python -m insclr.bench rerank [--n 200000] [--dim 2048] [--queries 70] [--device auto] [--json PATH]`

The problem: clustered unit features (clusters of `--cluster` images around random centres) and
queries near cluster centres, so that a query's top 1000 hold whole clusters and diffusion has
a graph to walk on. The database kNN graph is an input of both sides (in insclr it is the
candidate pool, `python -m insclr.pool`, benchmarked by `bench pool`): each image's neighbours
are the other members of its cluster by similarity, computed exactly within the cluster.

Timed, each side from the same features on its own device (ours: `--device`; numpy: the host):
  - αQE (k=2, α=3) of the queries: full score matrix, top-k, weighted sum;
  - DBA (k=10, α=3) of the database from the graph;
  - diffusion (Iscen et al. defaults, truncation 1000) from the graph; numpy solves each query's
    system exactly (`np.linalg.solve`), ours runs 20 conjugate-gradient iterations.
Headline ratio: total numpy time / total ours (αQE + DBA + diffusion medians).
"""

import numpy as np
import torch

from insclr.bench.common import median, parser, print_table, report, timed
from insclr.rerank import DIFFUSION_DEFAULTS, aqe, dba, diffusion


def clustered_problem(n, dim, nq, cluster=50, noise=0.5, k=50, seed=0):
    """(queries float32 [nq, dim], database float32 [n, dim], neighbors int64 [n, k'],
    similarities float32 [n, k'], positives: per query its cluster's database indices) with
    k' = min(k, cluster − 1), numpy."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // cluster)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    label = np.arange(n) % clusters
    db = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):   # in blocks: the temporaries stay small
        block = centres[label[s:s + 65536]] + noise * rng.standard_normal((len(label[s:s + 65536]), dim),
                                                                          dtype=np.float32)
        db[s:s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    qlabel = rng.integers(0, clusters, nq)
    q = centres[qlabel] + noise * rng.standard_normal((nq, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # members of cluster c are c, c + clusters, c + 2·clusters, ...: the graph is exact within clusters
    size = n // clusters
    kk = min(k, size - 1)
    members = label[:clusters, None] + clusters * np.arange(size)[None, :]          # [clusters, size]
    neighbors = np.empty((n, kk), dtype=np.int64)
    similarities = np.empty((n, kk), dtype=np.float32)
    for c in range(clusters):
        m = members[c]
        s = db[m] @ db[m].T
        np.fill_diagonal(s, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")[:, :kk]
        neighbors[m], similarities[m] = m[order], np.take_along_axis(s, order, 1)
    for i in range(clusters * size, n):   # leftovers: neighbours of their cluster
        m = members[label[i]]
        s = db[m] @ db[i]
        order = np.argsort(-s, kind="stable")[:kk]
        neighbors[i], similarities[i] = m[order], s[order]
    return q, db, neighbors, similarities, [np.flatnonzero(label == c) for c in qlabel]


def quality(q, db, positives, device):
    """mAP (%) of plain / +αQE / +DBA+αQE / +diffusion on the clustered problem (positives: the
    query's cluster): whether each method helps when the features carry the clusters. DBA and
    diffusion use the exact kNN graph of the features (not the timing's within-cluster graph,
    which knows the clusters), so this costs an N × N search."""
    from insclr.evaluate.metrics import instre_map, item_ranks, map_from_ranks, pad_items
    from insclr.rerank import knn_graph

    graph = knn_graph(db, DIFFUSION_DEFAULTS["k"], device)
    gnd = [{"ok": p.tolist()} for p in positives]
    items = pad_items(positives, len(db), device)
    out = {"plain": instre_map(q, db, gnd, device=device)["map"],
           "+aqe": instre_map(aqe(q, db, 2, 3.0, device=device), db, gnd, device=device)["map"]}
    db2 = dba(db, 10, 3.0, device=device, graph=graph)
    out["+dba+aqe"] = instre_map(aqe(q, db2, 2, 3.0, device=device), db2, gnd, device=device)["map"]
    params = dict(DIFFUSION_DEFAULTS, k=min(DIFFUSION_DEFAULTS["k"], graph[0].shape[1]))
    scores = diffusion(q, db, graph=graph, device=device, **params)
    out["+diffusion"] = map_from_ranks(item_ranks(scores, items), items, positives, [[]] * len(positives))["map"]
    return {k: 100 * v for k, v in out.items()}


def numpy_aqe(q, db, k, alpha):
    s = q @ db.T
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    w = np.maximum(np.take_along_axis(s, top, 1), 0) ** alpha
    out = q + np.einsum("qk,qkd->qd", w, db[top])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def numpy_dba(db, neighbors, similarities, k, alpha):
    out = np.empty_like(db)
    for i in range(len(db)):
        w = np.maximum(similarities[i, :k], 0) ** alpha
        v = db[i] + w @ db[neighbors[i, :k]]
        out[i] = v / np.linalg.norm(v)
    return out


def numpy_diffusion(q, db, neighbors, similarities, k=50, query_k=10, gamma=3.0, alpha=0.99, truncate=1000,
                    **_):
    n = len(db)
    scores = q @ db.T
    position = np.full(n, -1, dtype=np.int64)
    for row in scores:
        top = np.argsort(-row, kind="stable")[:truncate]
        position[top] = np.arange(len(top))
        pos = position[neighbors[top, :k]]
        position[top] = -1
        a = np.zeros((len(top), len(top)))
        i, j = np.nonzero(pos >= 0)
        a[i, pos[i, j]] = np.maximum(similarities[top][i, j], 0) ** gamma
        a = np.minimum(a, a.T)
        d = 1 / np.sqrt(np.maximum(a.sum(1), 1e-12))
        y = np.zeros(len(top))
        y[:query_k] = np.maximum(row[top[:query_k]], 0) ** gamma
        f = np.linalg.solve(np.eye(len(top)) - alpha * d[:, None] * a * d[None, :], y)
        row[top] = np.where(f > 0, 3 + f, row[top])
    return scores


def _overlap(a, b, depth=100):
    ta, tb = np.argsort(-a, 1)[:, :depth], np.argsort(-b, 1)[:, :depth]
    return float(np.mean([len(set(x) & set(y)) / depth for x, y in zip(ta, tb)]))


def main(argv=None):
    from insclr.args import positive_int

    p = parser("αQE + DBA and diffusion: insclr.rerank (chunked torch) vs plain numpy", "rerank")
    p.add_argument("--n", type=positive_int, default=200000, help="database size")
    p.add_argument("--dim", type=positive_int, default=2048)
    p.add_argument("--queries", type=positive_int, default=70)
    p.add_argument("--cluster", type=positive_int, default=50, help="images per cluster (graph neighbours + 1)")
    p.add_argument("--noise", type=float, default=0.5, help="per-coordinate noise around the cluster centres")
    p.add_argument("--quality", action="store_true",
                   help="also print the mAP of plain / +αQE / +DBA+αQE / +diffusion (positives: the query's cluster)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (ours; numpy runs on the host)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default torch's); numpy's BLAS follows OMP_NUM_THREADS")
    p.add_argument("--baseline-repeats", type=positive_int, default=1, help="timed runs of the numpy side")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    q, db, nb, sims, positives = clustered_problem(args.n, args.dim, args.queries, args.cluster, args.noise)
    tq, tdb = torch.from_numpy(q).to(device), torch.from_numpy(db).to(device)
    graph = (torch.from_numpy(nb).to(device), torch.from_numpy(sims).to(device))
    params = dict(DIFFUSION_DEFAULTS, k=min(DIFFUSION_DEFAULTS["k"], nb.shape[1]))
    out = {}

    def ours_diffusion():
        out["diffusion"] = diffusion(tq, tdb, graph=graph, device=device, **params)

    def base_diffusion():
        out["np_diffusion"] = numpy_diffusion(q, db, nb, sims, **params)

    cases = [("aqe k=2", lambda: out.update(aqe=aqe(tq, tdb, 2, 3.0, device=device)),
              lambda: out.update(np_aqe=numpy_aqe(q, db, 2, 3.0))),
             ("dba k=10 (from the graph)", lambda: out.update(dba=dba(tdb, 10, 3.0, device=device, graph=graph)),
              lambda: out.update(np_dba=numpy_dba(db, nb, sims, 10, 3.0))),
             ("diffusion (truncate 1000)", ours_diffusion, base_diffusion)]
    rows, figures = [], {}
    for name, ours, base in cases:
        t_ours = timed(ours, args.repeats, sync=sync)
        t_base = timed(base, args.baseline_repeats, warmup=0)
        rows.append({"step": name, "ours_s": median(t_ours), "numpy_s": median(t_base),
                     "speed-up": median(t_base) / median(t_ours)})
        figures[name.split()[0]] = {"ours_s": t_ours, "numpy_s": t_base}
    diffs = {"aqe_max_abs": float(np.abs(out["aqe"].cpu().numpy() - out["np_aqe"]).max()),
             "dba_max_abs": float(np.abs(out["dba"].cpu().numpy() - out["np_dba"]).max()),
             "diffusion_top100_overlap": _overlap(out["diffusion"].cpu().numpy(), out["np_diffusion"])}
    total_ours = sum(r["ours_s"] for r in rows)
    total_base = sum(r["numpy_s"] for r in rows)
    rows.append({"step": "total", "ours_s": total_ours, "numpy_s": total_base, "speed-up": total_base / total_ours})
    print_table(rows, ["step", "ours_s", "numpy_s", "speed-up"],
                title=f"{args.queries} queries x {args.n} x {args.dim}, ours on {device}, numpy on the host")
    print("agreement: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    if args.quality:
        figures["map"] = quality(tq, tdb, positives, device)
        print("mAP %: " + ", ".join(f"{k} {v:.2f}" for k, v in figures["map"].items()))
    report("rerank", total_base / total_ours, {"device": str(device), "threads": torch.get_num_threads(),
                                               "n": args.n, "dim": args.dim,
                                               "queries": args.queries, "cluster": args.cluster,
                                               "steps": figures, "agreement": diffs, "table": rows}, args.json)
    return 0
