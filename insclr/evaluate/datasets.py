"""Evaluation sets as shard folders (docs/formats.md) and how each is read (ALGORITHM §11).

`load_eval_set(name, shards_root)` resolves where the database and the queries of a set live,
its ground truth, and the protocol's image sizes and scales.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from insclr.shard.manifest import Manifest

MULTI_SCALE = (1.0, 1 / math.sqrt(2), 0.5)
GLDV2_SCALES = (1.414, 1.0, 0.7)  # the original GLDv2 evaluator's; √2 as it writes it (sizes floor(1.414 s))
NAMES = ("roxford5k", "rparis6k", "instre", "gldv2")


@dataclass
class EvalSet:
    name: str                 # roxford5k | rparis6k | instre | gldv2
    kind: str                 # revisitop | instre | gldv2
    database: Manifest        # split "part" is the database
    queries: Manifest         # split `query_split` holds the queries
    query_split: str
    query_mode: str           # "query" (crop to the box) or "longest" (whole image)
    gnd: list                 # per query: revisitop {easy, hard, junk}, instre {ok}, gldv2 {usage, positives}
    size: int                 # longer side of database images (and the query scaling, §11)
    scales: tuple             # multi-scale feature scales (§2)

    @property
    def num_queries(self):
        return len(self.gnd)


def _check_type(manifest, gt, expected):
    where = manifest.root / "ground_truth.json"
    if gt is None:
        raise FileNotFoundError(f"{where} is missing: {manifest.root} is not an evaluation shard folder")
    if gt.get("type") != expected:
        raise ValueError(f"{where}: type {gt.get('type')!r}, expected {expected!r}")
    if not isinstance(gt.get("gnd"), list):
        raise ValueError(f"{where}: 'gnd' must be a list")


def _check_entries(manifest, gnd, keys, lists):
    """Every entry has `keys`, a 4-value box, and `lists` of database indices within the folder;
    one entry per query sample."""
    where, n = manifest.root / "ground_truth.json", manifest.num_samples("part")
    if "query" in manifest.splits and len(gnd) != manifest.num_samples("query"):
        raise ValueError(f"{where}: {len(gnd)} entries for {manifest.num_samples('query')} query samples")
    for q, g in enumerate(gnd):
        missing = [k for k in keys if k not in g]
        if missing:
            raise ValueError(f"{where}: entry {q} lacks {missing}")
        if not isinstance(g["bbx"], list) or len(g["bbx"]) != 4:
            raise ValueError(f"{where}: entry {q}: 'bbx' must be 4 numbers [x1, y1, x2, y2], got {g['bbx']!r}")
        for key in lists:
            bad = [i for i in g[key] if not isinstance(i, int) or not 0 <= i < n]
            if bad:
                raise ValueError(f"{where}: entry {q}: {key!r} holds index {bad[0]!r}, outside the {n} database "
                                 f"images of {manifest.root}")


def _revisitop(name, root):
    m = Manifest.load(root)
    gt = m.ground_truth()
    _check_type(m, gt, "revisitop")
    _check_entries(m, gt["gnd"], ("easy", "hard", "junk", "bbx"), ("easy", "hard", "junk"))
    return EvalSet(name, "revisitop", m, m, "query", "query", gt["gnd"], 1024, MULTI_SCALE)


def _instre(root):
    m = Manifest.load(root)
    gt = m.ground_truth()
    _check_type(m, gt, "instre")
    _check_entries(m, gt["gnd"], ("ok", "bbx"), ("ok",))
    return EvalSet("instre", "instre", m, m, "query", "query", gt["gnd"], 256, (1.0,))


def _gldv2(shards_root):
    test = Manifest.load(Path(shards_root) / "gldv2-test")
    gt = test.ground_truth()
    _check_type(test, gt, "gldv2")
    index = Manifest.load(Path(shards_root) / gt.get("index", "gldv2-index"))
    position = {image_id: i for i, image_id in enumerate(index.ids("part"))}
    gnd = []
    for q, g in enumerate(gt["gnd"]):
        if g.get("usage") not in ("Public", "Private", "Ignored"):
            raise ValueError(f"{test.root}/ground_truth.json: entry {q} has usage {g.get('usage')!r}")
        unknown = [i for i in g.get("index_ids", []) if i not in position]
        if unknown and g["usage"] != "Ignored":
            raise ValueError(f"{test.root}/ground_truth.json: entry {q} names index ids not in "
                             f"{index.root}: {unknown[:3]}")
        gnd.append({"usage": g["usage"], "positives": [position[i] for i in g.get("index_ids", [])
                                                       if i in position]})
    return EvalSet("gldv2", "gldv2", index, test, "part", "longest", gnd, 1024, GLDV2_SCALES)


def load_eval_set(name, shards_root):
    """The evaluation set `name` (one of NAMES) under `shards_root`."""
    root = Path(shards_root) / name
    if name in ("roxford5k", "rparis6k"):
        return _revisitop(name, root)
    if name == "instre":
        return _instre(root)
    if name == "gldv2":
        return _gldv2(shards_root)
    raise ValueError(f"unknown evaluation set {name!r}: expected one of {', '.join(NAMES)}")


def positive_sets(es):
    """Per query (positives, junk) index arrays for the picture and per-query AP: revisitop uses
    the Medium setup (easy + hard positive, junk junk)."""
    def arr(x):
        return np.asarray(x, dtype=np.int64).reshape(-1)
    if es.kind == "revisitop":
        return [(np.concatenate([arr(g["easy"]), arr(g["hard"])]), arr(g["junk"])) for g in es.gnd]
    if es.kind == "instre":
        return [(arr(g["ok"]), arr([])) for g in es.gnd]
    return [(arr(g["positives"]), arr([])) for g in es.gnd]
