"""Mining benchmark: memory bank v2 `get` + memory loss per step, ours vs the loop reference.

`python -m insclr.bench train` calls `run` (the training suite); this module's own main runs
it alone: `python -m insclr.bench.mining [--n N --dim D --get-size G ...] [--json PATH]`.

Both sides get the same bank, pool, step and generator seed; the pseudo-positive rows and
labels must be identical. The pool is synthetic with realistic similarity profiles: images
come in clusters whose members lie at cosine 0.35-0.95 of each other (their noise levels
differ), so every row crosses the 0.75 / 0.5 boundaries and the traversal has candidates
to select; the rest of each row are random images at similarities 0.45 down to 0.1.
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from insclr.bench import common
from insclr.loss import contrastive_loss
from insclr.mining import MemoryBankV2


def _reference():
    """The loop baseline, insclr.bench.reference_insclr (imported when a benchmark runs)."""
    from insclr.bench import reference_insclr

    return reference_insclr


def make_pool(n, dim, k, cluster=40, seed=0):
    """Clustered unit features [n, dim] and a pool (neighbors int32 [n, k], similarities fp16 [n, k])."""
    g = torch.Generator().manual_seed(seed)
    n = n - n % cluster
    centers = F.normalize(torch.randn(n // cluster, dim, generator=g), dim=1)
    spread = torch.rand(n, 1, generator=g) * 1.2 + 0.2
    feats = torch.randn(n, dim, generator=g).mul_(spread / dim ** 0.5)
    feats += centers.repeat_interleave(cluster, 0)
    feats = F.normalize(feats, dim=1)
    blocks = feats.view(n // cluster, cluster, dim)
    sims = torch.bmm(blocks, blocks.transpose(1, 2))                    # within-cluster similarities
    sims.diagonal(dim1=1, dim2=2).fill_(-2.0)                           # the image itself goes last
    mate_sims, order = sims.sort(dim=2, descending=True)
    base = (torch.arange(n) // cluster * cluster)[:, None]
    mates = (base + order.reshape(n, cluster))[:, :cluster - 1]
    mate_sims = mate_sims.reshape(n, cluster)[:, :cluster - 1]
    rest = k - (cluster - 1)
    others = torch.randint(0, n, (n, rest), generator=g)
    top = torch.minimum(mate_sims[:, -1:], torch.tensor(0.45))
    profile = top - (top - 0.1) * torch.linspace(0, 1, rest)[None, :]
    neighbors = torch.cat([mates, others], dim=1)[:, :k].to(torch.int32)
    similarities = torch.cat([mate_sims, profile], dim=1)[:, :k].half()
    return feats, neighbors.numpy(), similarities.numpy()


def make_step(neighbors, anchors, k, seed=1):
    """Indices and labels of one step in §4 order; one neighbour in four rejected (§5)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randperm(len(neighbors), generator=g)[:anchors]
    idx = torch.cat([a, torch.from_numpy(neighbors[a.numpy(), :k]).long().flatten()])
    labels = torch.cat([a + 1, (a + 1).repeat_interleave(k)])
    labels[anchors::4] *= -1
    return idx, labels


def _generator(device, seed=7):
    """The fill draw's generator, on the bank's device (as the training loop passes it)."""
    return torch.Generator(device=device).manual_seed(seed)


def _step(get, loss_fn, idx, labels, x, device):
    """One memory step: get the rows, memory loss forward and backward; returns what was got."""
    feats, row_labels, _ = get(idx, labels, _generator(device))
    loss, _ = loss_fn(x, labels, feats, row_labels, 0.4, memory=True)
    loss.backward()
    x.grad = None
    return row_labels, loss.item()


def run(n=200_000, dim=2048, get_size=100_000, anchors=16, k=3, repeats=3, device="cpu", pool_k=500,
        mode="b+i_tr4_avg0.60_k05", ref_repeats=None):
    """Time bank v2 get + memory loss per step, ours vs the loop reference; returns the figures."""
    ref_mod = _reference()
    t0 = time.perf_counter()
    feats, neighbors, similarities = make_pool(n, dim, pool_k)
    n = len(feats)
    bank = MemoryBankV2(neighbors, similarities, n, dim, 0.75, 0.5, mode, get_size, device=device)
    setup_s = time.perf_counter() - t0
    bank.fill(torch.arange(n), feats, feats)
    idx, labels = make_step(neighbors, anchors, k)
    x = feats[idx].clone().to(device).requires_grad_()

    def ours():
        return _step(bank.get, contrastive_loss, idx.to(device), labels.to(device), x, device)

    ref = ref_mod.ReferenceBankV2.from_bank(bank)
    x_ref = x.detach().cpu().clone().requires_grad_()

    def theirs():
        return _step(ref.get, ref_mod.loss_loop, idx, labels, x_ref, "cpu")

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    ours_out, theirs_out = ours(), theirs()
    ours_rows, ref_rows = bank.last_rows.cpu(), ref.last_rows
    ours_pos, ref_pos = ours_out[0].cpu() <= n, theirs_out[0] <= n
    positives_equal = (torch.equal(ours_rows[ours_pos], ref_rows[ref_pos])
                       and torch.equal(ours_out[0].cpu()[ours_pos], theirs_out[0][ref_pos]))
    if not positives_equal:
        # on the CPU both sides do the same float32 arithmetic: any difference is a bug; on a GPU a
        # traversal score within rounding of its threshold may fall the other way (reported, counted)
        if torch.device(device).type == "cpu":
            raise AssertionError("mining benchmark: our pseudo-positives differ from the reference")
        print(f"warning: {int(ours_pos.sum())} pseudo-positives here, {int(ref_pos.sum())} in the reference "
              f"(rounding at a traversal threshold on the GPU?)", file=sys.stderr)
    # on the CPU the same generator draws the same negatives too; a GPU generator draws others
    rows_equal = torch.equal(ours_rows, ref_rows) and torch.equal(ours_out[0].cpu(), theirs_out[0])
    if torch.device(device).type == "cpu" and not rows_equal:
        raise AssertionError("mining benchmark: our memory rows differ from the reference")
    ours_t = common.timed(ours, repeats=repeats, warmup=0, sync=sync)
    theirs_t = common.timed(theirs, repeats=ref_repeats or repeats, warmup=0)
    stats = bank.get(idx.to(device), labels.to(device), _generator(device))[2]
    ours_s, theirs_s = common.median(ours_t), common.median(theirs_t)
    # the parts: index mining alone, and get (mining + gathering the rows' features)
    parts = {}
    for name, fn_ours, fn_ref in (("mining", bank.select_rows, ref.select_rows), ("get", bank.get, ref.get)):
        t_ours = common.timed(lambda: fn_ours(idx.to(device), labels.to(device), _generator(device)),
                              repeats=repeats, warmup=0, sync=sync)
        t_ref = common.timed(lambda: fn_ref(idx, labels, _generator("cpu")),
                             repeats=ref_repeats or repeats, warmup=0)
        parts[name] = {"ours_s": common.median(t_ours), "reference_s": common.median(t_ref),
                       "ratio": common.median(t_ref) / common.median(t_ours)}
    # the floor both sides pay: gathering the step's rows and the float32 product with them
    rows = bank.last_rows

    def floor():
        with torch.no_grad():
            return x.detach() @ bank.gather("bank", rows).float().T

    floor_s = common.median(common.timed(floor, repeats=repeats, warmup=1, sync=sync))
    return {"parts": parts, "floor_s": floor_s, "ratio_bound": theirs_s / floor_s, "n": n, "dim": dim, "get_size": get_size, "anchors": anchors, "k": k, "pool_k": pool_k,
            "mode": mode, "device": str(device), "setup_s": setup_s,
            "ours_step_s": ours_s, "reference_step_s": theirs_s, "ratio": theirs_s / ours_s,
            "ours_times_s": ours_t, "reference_times_s": theirs_t,
            "loss_ours": ours_out[1], "loss_reference": theirs_out[1], "rows_identical": rows_equal,
            "positives_identical": positives_equal,
            "positives": stats["positives"], "selected": stats["selected"],
            "candidates": stats["candidates"], "init_negatives": stats["init_negatives"]}


def floor_row(fig):
    """Table row: the gather + float32 product both sides pay, and the ratio it allows at most."""
    return {"what": f"shared floor: gather {fig['get_size']} rows + product (ratio <= {fig['ratio_bound']:.1f})",
            "ours_ms": fig["floor_s"] * 1e3, "reference_ms": fig["floor_s"] * 1e3, "ratio": 1.0}


def boundaries_setup(n=20_000, pool_k=500):
    """The pool boundary set-up (pb and nb), vectorised vs the original's per-entry loop."""
    from insclr.mining import boundaries

    ref_mod = _reference()
    _, _, sims = make_pool(n, 64, pool_k)
    ours_t = common.timed(lambda: (boundaries(sims, 0.75), boundaries(sims, 0.5)), repeats=3, warmup=0)
    t0 = time.perf_counter()
    ref = ref_mod.boundaries_loop(sims, 0.75), ref_mod.boundaries_loop(sims, 0.5)
    theirs_s = time.perf_counter() - t0
    assert np.array_equal(ref[0], boundaries(sims, 0.75).numpy())
    return {"n": n, "ours_s": common.median(ours_t), "reference_s": theirs_s,
            "ratio": theirs_s / common.median(ours_t)}


def main(argv=None):
    from insclr.args import nonnegative_int, positive_int

    p = common.parser("memory bank v2 get + memory loss per step: ours vs the loop reference")
    p.add_argument("--n", type=positive_int, default=200_000, help="images in the bank")
    p.add_argument("--dim", type=positive_int, default=2048)
    p.add_argument("--get-size", type=positive_int, default=100_000)
    p.add_argument("--anchors", type=positive_int, default=16)
    p.add_argument("--k", type=positive_int, default=3, help="neighbours per anchor in the step")
    p.add_argument("--pool-k", type=positive_int, default=500, help="neighbours per image in the pool")
    p.add_argument("--mode", default="b+i_tr4_avg0.60_k05")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--setup-n", type=nonnegative_int, default=20_000, help="rows for the boundary set-up timing (0: skip)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fig = run(args.n, args.dim, args.get_size, args.anchors, args.k, args.repeats, args.device,
              args.pool_k, args.mode)
    rows = [{"what": f"{name} only", "ours_ms": part["ours_s"] * 1e3, "reference_ms": part["reference_s"] * 1e3,
             "ratio": part["ratio"]} for name, part in fig["parts"].items()]
    rows.append({"what": "get + memory loss (fwd+bwd)", "ours_ms": fig["ours_step_s"] * 1e3,
                 "reference_ms": fig["reference_step_s"] * 1e3, "ratio": fig["ratio"]})
    rows.append(floor_row(fig))
    if args.setup_n:
        fig["boundaries"] = boundaries_setup(args.setup_n, args.pool_k)
        b = fig["boundaries"]
        rows.append({"what": f"pool boundaries ({b['n']} rows)", "ours_ms": b["ours_s"] * 1e3,
                     "reference_ms": b["reference_s"] * 1e3, "ratio": b["ratio"]})
    common.print_table(rows, ["what", "ours_ms", "reference_ms", "ratio"],
                       title=f"mining: N={fig['n']} D={fig['dim']} get_size={fig['get_size']} "
                             f"{fig['anchors']}x(1+{fig['k']}) mode {fig['mode']} on {fig['device']} "
                             f"(medians; {fig['positives']} pseudo-positives, {fig['selected']} selected)")
    common.report("mining", fig["ratio"], fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
