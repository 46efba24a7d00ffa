"""Our evaluation against the original InsCLR evaluator, on the same model and the same images.

    python -m insclr.bench.original_eval --original DIR --data DIR --shards DIR [--size 256] [--json PATH]

--original: a checkout of the original InsCLR code (e.g. `git -C MIRROR archive HEAD | tar -x -C DIR`);
nothing of it is imported before this command runs, and nothing of it ships here. --data: the
datasets in their own layout (`python -m insclr.synth --root DIR`), --shards: the same sets
sharded (`python -m insclr.shard`: roxford5k, rparis6k, instre, gldv2-index, gldv2-test).

One random-init model (seeded) goes through `insclr.evaluate.evaluate` (float32 forward and
features) and through the original's evaluators (their ImagesFromList, PIL thumbnail, their
multi-scale extraction and metrics). INSTRE: the original's evaluator is given our ground-truth
reading (1-based `ok`, x1,y1,x2,y2 boxes; docs/algorithm.md names it a deliberate difference) so
that the figures compare image processing only. Printed per protocol: both mAPs (percent), their
difference, and how far the features are apart (1 - cosine, per image).
"""

import argparse
import math
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

REVISITOP_SCALES = (1.0, 1 / math.sqrt(2), 0.5)  # the original's TEST.SCALES default
GLDV2_SCALES = (1.414, 1.0, 0.7)                 # its GLDRetrievalEvaluator's default


def _shims():
    """What the original needs of a 2021 environment: Image.ANTIALIAS (Pillow < 10, = LANCZOS),
    np.in1d (numpy < 2, = isin) and sklearn's PCA, imported by its INSTRE evaluator and used only
    with pca=True (not here)."""
    from PIL import Image

    if not hasattr(np, "in1d"):
        np.in1d = np.isin

    if not hasattr(Image, "ANTIALIAS"):
        Image.ANTIALIAS = Image.Resampling.LANCZOS
    try:
        import sklearn.decomposition  # noqa: F401
    except ImportError:
        stub = types.ModuleType("sklearn.decomposition")
        stub.PCA = None
        sys.modules.setdefault("sklearn", types.ModuleType("sklearn"))
        sys.modules["sklearn.decomposition"] = stub


class _TupleOutput(torch.nn.Module):
    """The original's models return (features, ...); ours returns features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model(x),)


def _revisitop_maps(ev, ranks):
    """The original ImageSearchEvaluator.evaluate's three setups, on its compute_map."""
    setups = {"E": (("easy",), ("junk", "hard")), "M": (("easy", "hard"), ("junk",)),
              "H": (("hard",), ("junk", "easy"))}
    out = {}
    for name, (ok, junk) in setups.items():
        gnd = [{"ok": np.concatenate([g[k] for k in ok]), "junk": np.concatenate([g[k] for k in junk])}
               for g in ev.gnd]
        out[f"map{name}"] = ev.compute_map(ranks, gnd, [1, 5, 10])[0]
    return out


def _original(name, data, size, model):
    """(metrics, query features, database features, query ids or None, database ids or None)."""
    from benchmark.evaluation import GLDRetrievalEvaluator, InstreEvaluator, RParis6kEvaluator, ROxford5kEvaluator
    from benchmark.evaluation.gld_retrieval_evaluation import MeanAveragePrecision
    from benchmark.utils.extract_fn import extract_features

    root = str(Path(data) / name)
    if name in ("roxford5k", "rparis6k"):
        ev = (ROxford5kEvaluator if name == "roxford5k" else RParis6kEvaluator)(root, size, list(REVISITOP_SCALES))
    elif name == "instre":
        import scipy.io

        ev = InstreEvaluator(root, size, [1.0])
        gnd = scipy.io.loadmat(str(Path(root) / "gnd_instre.mat"))["gnd"][0]
        ev.gnd = [{"ok": np.asarray(g[0]).ravel().astype(np.int64) - 1} for g in gnd]  # our reading
        ev.query_dataloader.dataset.bboxes = [tuple(np.asarray(g[1], dtype=np.float64).ravel()) for g in gnd]
    else:
        ev = GLDRetrievalEvaluator(str(Path(data) / "gldv2"), size, GLDV2_SCALES)
    q = extract_features(ev.query_dataloader, model, "cpu", ev.scales)
    db = extract_features(ev.index_dataloader, model, "cpu", ev.scales)
    scores = q @ db.T
    if name == "gldv2":
        ind = np.argsort(-scores, axis=1)
        metrics = {f"map100_{s}": MeanAveragePrecision(ev.generate_predictions(ind, sol, 100), sol, 100)
                   for s, sol in (("public", ev.public_solution), ("private", ev.private_solution))}
        qids = sorted(ev.query_img_to_idx, key=ev.query_img_to_idx.get)
        return metrics, q, db, qids, [ev.index_idx_to_img[i] for i in range(len(db))]
    ranks = np.argsort(-scores, axis=1).T
    if name == "instre":
        return {"map": ev.compute_map(ranks, ev.gnd, [1, 5, 10])[0]}, q, db, None, None
    return _revisitop_maps(ev, ranks), q, db, None, None


def _feature_gap(ours, theirs, our_ids=None, their_ids=None):
    """max and mean over images of 1 - cos(ours, theirs) (rows matched by id where ids are given)."""
    ours = np.asarray(ours, dtype=np.float64)
    if our_ids is not None:
        position = {i: k for k, i in enumerate(our_ids)}
        ours = ours[[position[i] for i in their_ids]]
    gap = 1 - np.sum(ours * np.asarray(theirs, dtype=np.float64), axis=1)
    return float(gap.max()), float(gap.mean())


def compare(original, data, shards, size=256, arch="resnet18", seed=0, sets=("roxford5k", "rparis6k", "instre",
                                                                              "gldv2")):
    """Rows {dataset, metric, ours, original, diff (points), feature gaps} for each protocol."""
    from insclr.evaluate.core import evaluate
    from insclr.model import load_model
    from insclr.shard.manifest import Manifest

    torch.manual_seed(seed)
    model = load_model("random", arch=arch).eval()
    rows = []
    shards, data, original = Path(shards).resolve(), Path(data).resolve(), Path(original).resolve()
    sys.path.insert(0, str(original))
    _shims()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path.cwd()
        try:
            import os

            os.chdir(tmp)  # the original's INSTRE evaluator writes its query crops to ./crop
            for name in sets:  # one set at a time, its rows printed as soon as it is done
                ours = evaluate(model, [name], shards, device="cpu", amp="none", size=size, save_features=tmp,
                                dtype="float32")
                metrics, q, db, qids, dbids = _original(name, data, size, _TupleOutput(model))
                our_q, our_db = np.load(Path(tmp) / f"{name}-queries.npy"), np.load(Path(tmp) / f"{name}-database.npy")
                if name == "gldv2":
                    test, index = Manifest.load(shards / "gldv2-test"), Manifest.load(shards / "gldv2-index")
                    gaps = _feature_gap(our_q, q, test.ids("part"), qids), _feature_gap(our_db, db, index.ids("part"),
                                                                                         dbids)
                else:
                    gaps = _feature_gap(our_q, q), _feature_gap(our_db, db)
                for metric, value in metrics.items():
                    mine = ours[name][metric]
                    rows.append({"dataset": name, "metric": metric, "ours": 100 * mine, "original": 100 * float(value),
                                 "diff": 100 * (mine - float(value)), "query_gap_max": gaps[0][0],
                                 "query_gap_mean": gaps[0][1], "db_gap_max": gaps[1][0], "db_gap_mean": gaps[1][1]})
                    print({k: round(v, 6) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        finally:
            os.chdir(cwd)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m insclr.bench.original_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--original", required=True, help="checkout of the original InsCLR code")
    p.add_argument("--data", required=True, help="datasets in their own layout (python -m insclr.synth)")
    p.add_argument("--shards", required=True, help="the same sets sharded (python -m insclr.shard)")
    p.add_argument("--size", type=int, default=256, help="longer side for every set (default 256)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-sets", default="roxford5k,rparis6k,instre,gldv2")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from insclr.io import print_table, write_json

    rows = compare(args.original, args.data, args.shards, args.size, args.arch, args.seed,
                   tuple(s for s in args.data_sets.split(",") if s))
    print_table(rows, list(rows[0]), title=f"ours vs the original evaluator: random {args.arch}, size {args.size}")
    worst = max(abs(r["diff"]) for r in rows)
    print(f"largest mAP difference: {worst:.3f} points")
    if args.json:
        write_json(args.json, {"rows": rows, "max_abs_diff": worst, "size": args.size, "arch": args.arch,
                               "seed": args.seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
