"""`python -m insclr.bench fidelity`: how many of the recipe's decisions a reduced precision flips.

On the synthetic set (made with `insclr.demo`'s data step when missing), one model computes every
quantity twice: in float32 everywhere (the original's precision), and with a GPU run's reduced
precisions (fp16 autocast and fp16 storage for the pool features, fp16
pool similarities, bf16 autocast for the no-aug forward, bf16 bank tables: our defaults before
they were measured). It counts the decisions that agree:

- pool: top-k overlap of every image's neighbour list (|A ∩ B| / k, mean over images);
- selection: keep/reject of every (anchor, first K neighbours) pair at the 0.6 cut (§5);
- bank v2: the pseudo-positive (index, label) pairs of memory steps, positive 0.75 / negative
  0.5 / `b+i_tr4_avg0.60_k05` (§8), |A ∩ B| / |A ∪ B| summed over steps;
- mAP: Medium / Hard mAP of the revisitop-style sets, features in fp16 against float32.

On a CPU the fp16 autocast of the pool and evaluation forwards is replaced by bf16 (CPUs have no
fast fp16 kernels); bf16 keeps fewer mantissa bits, so the flips counted are an upper bound.

Headline `ratio` = the smallest of the three fractions of decisions kept (1.0 = none flipped).
Each part also says how many decisions lie within 0.005 of their cut (where flips can happen).
On a CPU the reduced precisions are CPU autocast kernels, not the GPU's; the rounding of the
results to bf16/fp16 is the same.
"""

import time
from pathlib import Path

import numpy as np
import torch

from insclr.bench.common import parser, print_table, report

NEAR = 0.005  # a decision this close to its cut can flip with bf16/fp16 rounding


def _ensure_data(shards_root, data_root):
    shards_root = Path(shards_root)
    if all((shards_root / n / "manifest.json").is_file() for n in ("gldv2", "roxford5k", "rparis6k")):
        return
    from insclr.demo import prepare_data

    prepare_data(data_root, shards_root, seed=0)


def _features(model, shards, size, amp, dtype, device, scales=(1.0,), threads=2):
    from insclr.data import StreamLoader
    from insclr.features import extract

    loader = StreamLoader(shards, split="part", mode="square", size=size, batch_size=16, device=device,
                          num_threads=threads)
    return extract(model, loader, scales, device, amp, show=False, dtype=dtype)


def pool_overlap(nb_a, nb_b):
    """Mean over rows of |top-k(a) ∩ top-k(b)| / k."""
    k = nb_a.shape[1]
    same = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(nb_a, nb_b)]
    return float(np.mean(same)) / k


def selection_agreement(g_a, g_b, neighbors, k, thresh):
    """(fraction of equal keep decisions, pairs, pairs near the cut) over (i, neighbors[i, :k])."""
    i = np.repeat(np.arange(len(neighbors)), k)
    j = neighbors[:, :k].reshape(-1)
    s_a = (g_a[i].astype(np.float32) * g_a[j].astype(np.float32)).sum(1)
    s_b = (g_b[i].astype(np.float32) * g_b[j].astype(np.float32)).sum(1)
    same = (s_a >= thresh) == (s_b >= thresh)
    return float(same.mean()), len(same), int((np.abs(s_a - thresh) < NEAR).sum())


def _bank(neighbors, similarities, g, dtype, mode, pos, neg):
    from insclr.candidates import CandidatePool
    from insclr.mining import MemoryBankV2, Views

    n, d = g.shape
    bank = MemoryBankV2(CandidatePool.from_arrays(neighbors, similarities), d, pos, neg, mode, get_size=n,
                        use_negative=True, dtype=dtype)
    g = torch.from_numpy(np.asarray(g, dtype=np.float32))
    bank.fill(torch.arange(n), Views(g, g))
    return bank


def bank_agreement(pool_a, pool_b, g_a, g_b, dtype_b, steps, batch, k, mode, pos, neg, seed=0):
    """Pseudo-positive (index, label) pairs of `steps` memory steps from both set-ups: (|A∩B|/|A∪B|, |A∪B|).

    Each set-up forms its step from its own pool (anchors are the same draws, their neighbours
    are each pool's), as a training run would."""
    bank_a = _bank(*pool_a, g_a, torch.float32, mode, pos, neg)
    bank_b = _bank(*pool_b, g_b, dtype_b, mode, pos, neg)
    rng = np.random.default_rng(seed)
    inter = union = 0
    n = len(g_a)
    for _ in range(steps):
        anchors = rng.choice(n, size=batch, replace=False)
        pairs = []
        for bank, (nb, _) in ((bank_a, pool_a), (bank_b, pool_b)):
            idx = np.concatenate([anchors, nb[anchors, :k].reshape(-1)])
            lab = np.concatenate([anchors + 1, np.repeat(anchors + 1, k)])
            rows, labels, _ = bank.select_rows(torch.from_numpy(idx), torch.from_numpy(lab),
                                               generator=torch.Generator().manual_seed(0))
            keep = labels != bank.negative_label
            pairs.append(set(zip(rows[keep].tolist(), labels[keep].tolist())))
        inter += len(pairs[0] & pairs[1])
        union += len(pairs[0] | pairs[1])
    return (inter / union if union else 1.0), union


def boundary_near(similarities, cuts):
    return int(sum((np.abs(similarities.astype(np.float32) - c) < NEAR).sum() for c in cuts))


def _map(model, shards_root, amp, device, size):
    from insclr.evaluate import evaluate

    res = evaluate(model, ["roxford5k", "rparis6k"], shards_root, None, device, amp=amp, size=size)
    return {name: (100 * r["mapM"], 100 * r["mapH"]) for name, r in res.items()}


def _parser():
    p = parser(__doc__.split("\n\n")[0].split(": ", 1)[1], "fidelity")
    p.add_argument("--shards-root", default="shards/demo", help="folder of the synthetic shards (made when missing)")
    p.add_argument("--data", default="datasets/synth", help="where the synthetic images are written when missing")
    p.add_argument("--model", default="random", help="random (the demo's ResNet-18) | PATH of a model file")
    p.add_argument("--size", type=int, default=128, help="square side of the pool features (the demo's)")
    p.add_argument("--noaug-size", type=int, default=96, help="square side of the no-aug view")
    p.add_argument("--eval-size", type=int, default=256, help="longer side of the evaluation images")
    p.add_argument("--k", type=int, default=50, help="pool neighbours compared")
    p.add_argument("--steps", type=int, default=50, help="bank-v2 memory steps compared")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    from insclr.model import load_model
    from insclr.pool import knn

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    _ensure_data(args.shards_root, args.data)
    shards = Path(args.shards_root) / "gldv2"
    model = load_model(args.model, "resnet18", "linear_norm", 128, device=device).eval()
    t0 = time.perf_counter()
    f32 = _features(model, shards, args.size, "none", torch.float32, device)
    # the GPU's default pool forward is fp16 autocast; CPUs have no fast fp16 kernels (20× slower than
    # float32 here), so on a CPU it is bf16, coarser than fp16: an upper bound on the GPU's flips
    pool_amp = "fp16" if device.type == "cuda" else "bf16"
    f16 = _features(model, shards, args.size, pool_amp, torch.float16, device)
    nb32, sim32 = knn(f32, args.k, dtype=np.float32)
    nb16, sim16 = knn(f16, args.k, dtype=np.float16)
    overlap = pool_overlap(nb32, nb16)
    g32 = _features(model, shards, args.noaug_size, "none", torch.float32, device)
    gbf = _features(model, shards, args.noaug_size, "bf16", torch.float32, device)
    sel, sel_n, sel_near = selection_agreement(g32, gbf, nb32, 3, 0.6)
    bank, bank_n = bank_agreement((nb32, sim32), (nb16, sim16), g32, gbf, torch.bfloat16, args.steps, 16, 3,
                                  "b+i_tr4_avg0.60_k05", 0.75, 0.5)
    # one part at a time: which precision moves the bank-v2 decisions
    bank_sims_only, _ = bank_agreement((nb32, sim32), (nb32, sim32.astype(np.float16)), g32, g32, torch.float32,
                                       args.steps, 16, 3, "b+i_tr4_avg0.60_k05", 0.75, 0.5)
    bank_table_only, _ = bank_agreement((nb32, sim32), (nb32, sim32), g32, g32, torch.bfloat16,
                                        args.steps, 16, 3, "b+i_tr4_avg0.60_k05", 0.75, 0.5)
    bank_forward_only, _ = bank_agreement((nb32, sim32), (nb32, sim32), g32, gbf, torch.float32,
                                          args.steps, 16, 3, "b+i_tr4_avg0.60_k05", 0.75, 0.5)
    map32 = _map(model, args.shards_root, "none", device, args.eval_size)
    map16 = _map(model, args.shards_root, pool_amp, device, args.eval_size)
    seconds = time.perf_counter() - t0

    rows = [("pool top-k overlap", f"{overlap:.4f}", f"{len(nb32)} × {args.k}",
             f"{boundary_near(sim32, (0.75, 0.5))} sims near 0.75/0.5"),
            ("selection keep/reject (0.6)", f"{sel:.4f}", str(sel_n), f"{sel_near} near the cut"),
            ("bank-v2 pseudo-positives", f"{bank:.4f}", str(bank_n), ""),
            ("  only pool sims fp16", f"{bank_sims_only:.4f}", "", ""),
            ("  only bank tables bf16", f"{bank_table_only:.4f}", "", ""),
            ("  only no-aug forward bf16", f"{bank_forward_only:.4f}", "", "")]
    for name in map32:
        rows.append((f"mAP {name} M / H ({pool_amp} − float32)",
                     f"{map16[name][0] - map32[name][0]:+.3f} / {map16[name][1] - map32[name][1]:+.3f}",
                     f"{map32[name][0]:.2f} / {map32[name][1]:.2f}", "points"))
    columns = ["decision", "fraction kept", "decisions", "note"]
    print_table([dict(zip(columns, r)) for r in rows], columns)
    ratio = min(overlap, sel, bank)
    figures = {"pool_overlap": overlap, "selection_kept": sel, "selection_pairs": sel_n,
               "selection_near_cut": sel_near, "bank_v2_kept": bank, "bank_v2_pairs": bank_n,
               "bank_v2_kept_sims_fp16_only": bank_sims_only, "bank_v2_kept_tables_bf16_only": bank_table_only,
               "bank_v2_kept_noaug_bf16_only": bank_forward_only,
               "map_float32": map32, "map_reduced": map16, "seconds": round(seconds, 1),
               "model": args.model, "device": str(device), "k": args.k, "steps": args.steps,
               "pool_and_eval_autocast": pool_amp}
    report("fidelity", ratio, figures, args.json)
    return 0
