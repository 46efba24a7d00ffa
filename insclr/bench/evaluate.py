"""Benchmark: revisitop scoring + mAP, ours (chunked rank counting) vs the reference approach.

`python -m insclr.bench evaluate [--n 200000] [--dim 2048] [--queries 70] [--device auto] [--json PATH]`

Both sides start from the same features on the same device. The baseline is what the revisitop
evaluation code does: the full score matrix, a full argsort of every query's row on the host,
then the compute_map loop (tests/reference_revisitop.py's algorithm, vendored here as
`_reference_*` so the benchmark does not import tests). Ours: `revisitop_map_features`.
"""

import numpy as np
import torch

from insclr.bench.common import median, parser, print_table, report, timed
from insclr.evaluate.metrics import revisitop_map, revisitop_map_features


def random_problem(n, dim, nq, seed=0, device="cpu"):
    """Unit-norm random features and Oxford-like ground truth (easy/hard/junk up to ~100 each)."""
    g = torch.Generator().manual_seed(seed)
    db = torch.empty(n, dim)
    for c0 in range(0, n, 50000):   # fill in blocks to keep the temporary small
        block = torch.randn(min(50000, n - c0), dim, generator=g)
        db[c0:c0 + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    queries = torch.nn.functional.normalize(torch.randn(nq, dim, generator=g), dim=1)
    rng = np.random.default_rng(seed)
    gnd = []
    for _ in range(nq):
        pick = rng.choice(n, min(n, int(rng.integers(10, 300))), replace=False)  # n < 300: a small test run
        a, b = sorted(rng.integers(0, pick.size, 2))
        gnd.append({"easy": pick[:a].tolist(), "hard": pick[a:b].tolist(), "junk": pick[b:].tolist()})
    return queries.to(device), db.to(device), gnd


def _reference_ap(pos, nres):
    ap = 0.0
    for j, rank in enumerate(pos):
        p0 = 1.0 if rank == 0 else j / rank
        ap += (p0 + (j + 1) / (rank + 1)) / (2.0 * nres)
    return ap


def _reference_map(ranks, oks, junks, kappas):
    aps, prs = [], []
    for i in range(len(oks)):
        if len(oks[i]) == 0:
            continue
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], oks[i])]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], junks[i])]
        pos = pos - np.searchsorted(junk, pos)       # the revisitop while-loop, same numbers
        aps.append(_reference_ap(pos, len(oks[i])))
        one = pos + 1
        prs.append([(one <= min(one.max(), k)).sum() / min(one.max(), k) for k in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


def reference(queries, db, gnd, kappas=(1, 5, 10), scores=None):
    """Full score matrix on the device, full argsort on the host, then the revisitop loop."""
    if scores is None:
        scores = (db @ queries.T).cpu().numpy()        # N x Q, revisitop's layout
    ranks = np.argsort(-scores, axis=0)
    out = {}
    for name, ok, junk in (("E", ("easy",), ("junk", "hard")), ("M", ("easy", "hard"), ("junk",)),
                           ("H", ("hard",), ("junk", "easy"))):
        oks = [np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok]) for g in gnd]
        junks = [np.concatenate([np.asarray(g[k], dtype=np.int64) for k in junk]) for g in gnd]
        out["map" + name], out["mpr" + name] = _reference_map(ranks, oks, junks, kappas)
    return out


def main(argv=None):
    from insclr.args import positive_int

    p = parser("revisitop scoring + mAP: chunked rank counting vs full argsort + loop", "evaluate")
    p.add_argument("--n", type=positive_int, default=200000, help="database size")
    p.add_argument("--dim", type=positive_int, default=2048)
    p.add_argument("--queries", type=positive_int, default=70)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--baseline-repeats", type=positive_int, default=1, help="timed runs of the (slow) baseline")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    queries, db, gnd = random_problem(args.n, args.dim, args.queries, device=device)

    ours_out, ref_out = {}, {}
    t_ours = timed(lambda: ours_out.update(revisitop_map_features(queries, db, gnd, device=device)),
                   args.repeats, sync=sync)
    t_ref = timed(lambda: ref_out.update(reference(queries, db, gnd)), args.baseline_repeats, warmup=0, sync=sync)
    # the floor both sides pay: the float32 score matrix itself
    t_floor = timed(lambda: queries @ db.T, args.repeats, sync=sync)
    # the part that differs: ranking + mAP from an already computed score matrix
    scores = queries @ db.T
    scores_np = scores.T.cpu().numpy()
    t_ours_rank = timed(lambda: revisitop_map(scores, gnd), args.repeats, sync=sync)
    t_ref_rank = timed(lambda: reference(None, None, gnd, scores=scores_np), args.baseline_repeats, warmup=0)
    del scores, scores_np
    diff = max(max(abs(ours_out["map" + s] - ref_out["map" + s]),
                   float(np.abs(ours_out["mpr" + s] - ref_out["mpr" + s]).max())) for s in "EMH")
    rows = [{"method": "ours (chunked rank count)", "median_s": median(t_ours), "mapM": ours_out["mapM"],
             "mapH": ours_out["mapH"]},
            {"method": "reference (argsort + loop)", "median_s": median(t_ref), "mapM": ref_out["mapM"],
             "mapH": ref_out["mapH"]},
            {"method": "ours, ranks + mAP from scores", "median_s": median(t_ours_rank)},
            {"method": "reference, argsort + loop from scores", "median_s": median(t_ref_rank)},
            {"method": f"shared floor: the score matrix (ratio <= {median(t_ref) / median(t_floor):.1f})",
             "median_s": median(t_floor)}]
    print_table(rows, ["method", "median_s", "mapM", "mapH"],
                title=f"{args.queries} queries x {args.n} x {args.dim} on {device}")
    print(f"max |difference| of mAP / mP@k: {diff:.2e}")
    ratio = median(t_ref) / median(t_ours)
    report("evaluate", ratio, {"device": str(device), "n": args.n, "dim": args.dim, "queries": args.queries,
                               "ours_s": t_ours, "reference_s": t_ref, "max_abs_diff": diff,
                               "ours_rank_s": t_ours_rank, "reference_rank_s": t_ref_rank,
                               "ratio_rank_only": median(t_ref_rank) / median(t_ours_rank),
                               "floor_s": t_floor, "ratio_bound": median(t_ref) / median(t_floor),
                               "equal": diff < 1e-9}, args.json)
    return 0 if diff < 1e-9 else 1
