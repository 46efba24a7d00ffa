"""`python -m insclr.bench pool`: faiss IndexFlatIP against chunked torch matmul + topk.

Both exact back ends of insclr.pool search the same random L2-normalised float16 features
(N × D, default 200,000 × 2048 as in the issue). An all-N search is ~N²·D·2 flop per method
(1.6e14 at the defaults: hours on a small CPU), so by default only the first --queries rows
are searched against the full N-row database; the table gives that measured time and the
all-N time extrapolated linearly from it (labelled "extrapolated"). Peak memory is the peak
resident set above the level before the method started (sampled every 5 ms; it sees faiss's
and torch's native allocations, which tracemalloc does not). The output file size compares
our format (int32 neighbours + float16 similarities) with the original project's (int64 +
float32) on the measured rows, and extrapolated to all N.

"ours" is the back end insclr.pool picks here by default (faiss without a GPU, faiss on the
GPUs with faiss-gpu, torch on a GPU without it); "baseline" is the other one.
"""

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from insclr import pool
from insclr.bench.common import PeakSampler, median, parser, print_table, report


def own_rss():
    """(resident bytes of this process,) from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return (int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"),)


def random_features(n, d, seed=0, block=1 << 15):
    """Random unit vectors as float16 [n, d], generated in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float16)
    for a in range(0, n, block):
        x = rng.standard_normal((min(block, n - a), d), dtype=np.float32)
        out[a:a + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def run_backend(backend, features, k, queries, chunk, repeats):
    """Build + search `queries` rows `repeats` times; returns figures and the last result."""
    with PeakSampler(own_rss, 0.005) as mem:
        t0 = time.perf_counter()
        _, search = pool.make_search(features, k, backend)
        build_s = time.perf_counter() - t0
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = pool.knn_rows(search, features, k, 0, queries, chunk)
            times.append(time.perf_counter() - t0)
        del search
    n = len(features)
    search_s = median(times)
    return {"backend": backend, "build_s": build_s, "search_s": search_s, "queries": queries,
            "queries_per_s": queries / search_s, "all_n_s_extrapolated": build_s + search_s * n / queries,
            "peak_rss_mb": (mem.peak[0] - mem.start[0]) / 2**20}, result


def file_sizes(neighbors, similarities, n):
    """Bytes of our .npz and the original format's on these rows, and extrapolated to n rows."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, orig = Path(tmp) / "ours.npz", Path(tmp) / "orig.npz"
        np.savez(ours, neighbors=neighbors, similarities=similarities)
        np.savez(orig, neighbors=neighbors.astype(np.int64), similarities=similarities.astype(np.float32))
        a, b = ours.stat().st_size, orig.stat().st_size
    scale = n / len(neighbors)
    return {"ours_bytes": a, "original_bytes": b, "size_ratio": a / b,
            "ours_mb_all_n_extrapolated": a * scale / 2**20, "original_mb_all_n_extrapolated": b * scale / 2**20}


def main(argv=None):
    from insclr.args import positive_int

    p = parser("exact kNN pool: faiss vs chunked torch matmul + topk", "pool")
    p.add_argument("--n", type=positive_int, default=200_000, help="database rows N (default 200,000)")
    p.add_argument("--dim", type=positive_int, default=2048, help="feature dimension D (default 2048)")
    p.add_argument("--queries", type=positive_int, default=500, help="query rows timed (default 500; N = all)")
    p.add_argument("--k", type=positive_int, default=500)
    p.add_argument("--chunk", type=positive_int, default=None, help="queries per chunk (default: insclr.pool's)")
    p.set_defaults(repeats=1)
    args = p.parse_args(argv)
    queries = min(args.queries, args.n)
    print(f"pool benchmark: N={args.n} D={args.dim} k={args.k}, {queries} queries timed "
          f"(torch threads {torch.get_num_threads()})")
    features = random_features(args.n, args.dim)
    ours = pool.pick_backend("auto")
    backends = [ours] + [b for b in ("faiss", "torch") if b != ours]
    rows, results = [], {}
    for b in backends:
        row, results[b] = run_backend(b, features, args.k, queries, args.chunk, args.repeats)
        row["role"] = "ours" if b == ours else "baseline"
        rows.append(row)
    same = float((results[backends[0]][0] == results[backends[1]][0]).mean())
    print_table(rows, ["role", "backend", "queries", "search_s", "queries_per_s", "build_s",
                       "all_n_s_extrapolated", "peak_rss_mb"],
                title=f"search of {queries} queries against N={args.n} (median of {args.repeats}); "
                      f"all-N time is EXTRAPOLATED linearly")
    sizes = file_sizes(*results[ours], args.n)
    print_table([sizes], list(sizes), title="\npool file size (measured rows; all-N extrapolated)")
    print(f"neighbour agreement between the back ends: {same:.5f}")
    ratio = rows[1]["search_s"] / rows[0]["search_s"]
    return 0 if report("pool", ratio, {"args": vars(args), "rows": rows, "file_size": sizes,
                                       "agreement": same}, args.json) else 1


if __name__ == "__main__":
    raise SystemExit(main())
