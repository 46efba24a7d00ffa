"""`python -m insclr.bench search`: queries per second of the exact index against IVF-PQ, with
the recall@10 of IVF-PQ against the exact top 10.

The database is N clustered unit vectors (default 50,000 × 512, the descriptor size of a
ResNet-18 model; --dim 2048 for ResNet-50/101): --clusters centres plus Gaussian noise, so that
near neighbours exist as they do among images of the same landmark. The queries are Q further
draws from the same clusters. Three searches, each timed over all Q queries in one batch (faiss
parallelises over queries), --repeats times, medians reported:

  exact         IndexFlatIP (what `insclr.search index` builds up to --exact-max rows)
  ivfpq         IVF-PQ codes only (`insclr.search query --refine 1`)
  ivfpq+refine  IVF-PQ candidates re-scored exactly (`query`'s default, --refine 10)

Index building (k-means of the lists and codebooks) is timed once. The headline ratio is
queries/s of ivfpq+refine over exact ("ours": what search uses above the threshold; "baseline":
the exact search it replaces).
"""

import time

import numpy as np

from insclr.bench.common import median, parser, print_table, report, timed
from insclr.search import DEFAULT_REFINE, Searcher, build_index, gpu_usable


def clustered(n, d, clusters, noise, rng):
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(truth, found, k=10):
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(truth, found)]))


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0], "search")
    p.add_argument("--n", type=int, default=50_000, help="database rows (default 50000)")
    p.add_argument("--dim", type=int, default=512, help="descriptor size (default 512)")
    p.add_argument("--queries", type=int, default=500, help="queries (default 500)")
    p.add_argument("--clusters", type=int, default=1000, 
                   help="clusters of the data (default 1000: 50 rows each, more than k)")
    p.add_argument("--noise", type=float, default=0.05, help="per-dimension noise around the centres")
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    database = clustered(args.n, args.dim, args.clusters, args.noise, rng)
    queries = clustered(args.queries, args.dim, args.clusters, args.noise, np.random.default_rng(1))
    use_gpu = gpu_usable()
    t0 = time.perf_counter()
    exact_index, _ = build_index(database, exact_max=args.n)
    build_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf_index, params = build_index(database, exact_max=0, use_gpu=use_gpu)
    build_ivf = time.perf_counter() - t0
    searchers = {"exact": Searcher(exact_index, use_gpu=use_gpu),
                 "ivfpq": Searcher(ivf_index, params["nprobe"], use_gpu=use_gpu, refine=1),
                 "ivfpq+refine": Searcher(ivf_index, params["nprobe"], use_gpu=use_gpu, features=database,
                                          refine=DEFAULT_REFINE)}
    results, rows = {}, []
    _, truth = searchers["exact"].search(queries, args.k)
    for name, s in searchers.items():
        times = timed(lambda: s.search(queries, args.k), repeats=args.repeats)
        _, found = s.search(queries, args.k)
        qps = args.queries / median(times)
        results[name] = {"queries_per_s": round(qps, 1), "seconds": [round(t, 4) for t in times],
                         "recall_at_10": round(recall_at(truth, found, args.k), 4), "device": s.device}
        rows.append({"method": name, "queries/s": qps, f"recall@{args.k} vs exact": results[name]["recall_at_10"],
                     "device": s.device})
    print_table(rows, list(rows[0]), title=f"search: {args.n} × {args.dim} database, {args.queries} queries, "
                                           f"IVF-PQ nlist {params['nlist']} m {params['m']} nbits {params['nbits']} "
                                           f"nprobe {params['nprobe']}; build exact {build_exact:.2f} s, "
                                           f"IVF-PQ {build_ivf:.1f} s")
    ratio = results["ivfpq+refine"]["queries_per_s"] / results["exact"]["queries_per_s"]
    return 0 if report("search", ratio, {"n": args.n, "dim": args.dim, "queries": args.queries,
                                         "ivfpq": params, "build_seconds": {"exact": build_exact, "ivfpq": build_ivf},
                                         "methods": results}, args.json) else 1
