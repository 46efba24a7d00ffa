"""Readers of each dataset's ORIGINAL on-disk layout.

A reader turns `--src DIR` into a `Source`: the ordered inputs of each split (path, id,
label) and a function that builds `ground_truth.json` once the dense sample indices are
known. Input order is the order of the dataset's own list files, so shard contents do not
depend on the file system. A missing or malformed list file raises an error naming it;
a missing image listed by it is not an error here (it becomes a "missing file" rejection).
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path

from insclr.shard.images import IMAGE_EXTENSIONS

DATASETS = ("gldv2", "gldv2-index", "gldv2-test", "instre", "roxford5k", "rparis6k", "revisitop1m", "folder")


@dataclass(frozen=True)
class Item:
    path: Path        # the input file
    id: str           # the dataset's own image id
    label: int = None  # landmark / instance, None when the dataset has none


@dataclass
class Source:
    dataset: str
    splits: dict                      # split name -> list[Item], "part" first
    ground_truth: object = None      # callable(index_maps) -> dict, index_maps[split][input] = sample or None
    notes: dict = field(default_factory=dict)


def read_source(dataset, src, min_images=15):
    """The Source of `dataset` (one of DATASETS) under folder (or list file, for folder) `src`."""
    src = Path(src)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not src.exists():
        raise FileNotFoundError(f"--src not found: {src}")
    if dataset == "gldv2":
        return gldv2_train(src, min_images)
    if dataset == "gldv2-index":
        return gldv2_index(src)
    if dataset == "gldv2-test":
        return gldv2_test(src)
    if dataset in ("roxford5k", "rparis6k"):
        return revisitop(dataset, src)
    if dataset == "instre":
        return instre(src)
    if dataset == "revisitop1m":
        return revisitop1m(src)
    return image_folder("folder", src)


# ---------------------------------------------------------------------------------- GLDv2

def _gldv2_path(src, folder, image_id):
    # One Path from a string: joining six parts per image costs more than decoding's overhead budget.
    return Path(f"{src}/{folder}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg")


def _read_csv(path, columns):
    """Rows of csv `path` as dicts; the header must contain `columns`. Errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a csv with columns {','.join(columns)})")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path}: header {header} lacks column(s) {missing}")
            rows = []
            for row in reader:
                if None in row or any(row.get(c) is None for c in columns):
                    raise ValueError(f"{path}:{reader.line_num}: wrong number of fields")
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: malformed csv: {e}") from None
    return rows


def _int_field(path, row_no, name, value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{row_no}: {name} {value!r} is not an integer") from None


def _check_id(path, row_no, image_id):
    if len(image_id) < 3 or "/" in image_id or image_id.startswith("."):
        raise ValueError(f"{path}:{row_no}: bad image id {image_id!r}")
    return image_id


def gldv2_train(src, min_images):
    """GLDv2 train-clean: `train_clean.csv` (landmark_id,images), images at train/a/b/c/<id>.jpg.

    Landmarks with fewer than `min_images` listed images are left out (the recipe's filter).
    """
    path = src / "train_clean.csv"
    items, dropped = [], 0
    for row_no, row in enumerate(_read_csv(path, ["landmark_id", "images"]), start=2):
        landmark = _int_field(path, row_no, "landmark_id", row["landmark_id"])
        ids = row["images"].split()
        if len(ids) < min_images:
            dropped += 1
            continue
        items += [Item(_gldv2_path(src, "train", _check_id(path, row_no, i)), i, landmark) for i in ids]
    return Source("gldv2", {"part": items}, notes={"landmarks_below_min_images": dropped})


def gldv2_index(src):
    """GLDv2 retrieval index: ids and landmarks from index_image_to_landmark.csv (else index.csv)."""
    labelled = src / "index_image_to_landmark.csv"
    if labelled.is_file():
        rows = _read_csv(labelled, ["id", "landmark_id"])
        items = [Item(_gldv2_path(src, "index", _check_id(labelled, n, r["id"])), r["id"],
                      _int_field(labelled, n, "landmark_id", r["landmark_id"]))
                 for n, r in enumerate(rows, start=2)]
    else:
        plain = src / "index.csv"
        if not plain.is_file():
            raise FileNotFoundError(f"{labelled}: not found (nor {plain}): cannot list the GLDv2 index images")
        items = [Item(_gldv2_path(src, "index", _check_id(plain, n, r["id"])), r["id"])
                 for n, r in enumerate(_read_csv(plain, ["id"]), start=2)]
    return Source("gldv2-index", {"part": items})


def gldv2_test(src):
    """GLDv2 retrieval queries: retrieval_solution_v2.1.csv (id,images,Usage), images at test/a/b/c/."""
    path = src / "retrieval_solution_v2.1.csv"
    rows = _read_csv(path, ["id", "images", "Usage"])
    items, gnd = [], []
    for row_no, row in enumerate(rows, start=2):
        usage = row["Usage"]
        if usage not in ("Public", "Private", "Ignored"):
            raise ValueError(f"{path}:{row_no}: Usage {usage!r} is not Public, Private or Ignored")
        items.append(Item(_gldv2_path(src, "test", _check_id(path, row_no, row["id"])), row["id"]))
        positives = row["images"].split()
        gnd.append({"usage": usage, "index_ids": [] if positives == ["None"] else positives})

    def ground_truth(index_maps):
        kept = [g for g, sample in zip(gnd, index_maps["part"]) if sample is not None]
        return {"type": "gldv2", "index": "gldv2-index", "gnd": kept}

    return Source("gldv2-test", {"part": items}, ground_truth)


# ------------------------------------------------------------------------------ revisitop

def _load_pickle(path):
    """The revisitop ground truth: lists, dicts and numpy arrays only (insclr.safe_load)."""
    from insclr.safe_load import load_pickle

    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground-truth file not found")
    return load_pickle(path)


def _remap(indices, mapping, what):
    """Dense sample indices of input positions `indices`, rejected ones dropped."""
    out = []
    for i in indices:
        i = int(i)
        if not 0 <= i < len(mapping):
            raise ValueError(f"{what}: index {i} outside 0..{len(mapping) - 1}")
        if mapping[i] is not None:
            out.append(mapping[i])
    return out


def revisitop(name, src):
    """roxford5k / rparis6k: gnd_<name>.pkl (imlist, qimlist, gnd[q] bbx/easy/hard/junk) + jpg/."""
    path = src / f"gnd_{name}.pkl"
    data = _load_pickle(path)
    if not isinstance(data, dict) or not all(k in data for k in ("imlist", "qimlist", "gnd")):
        raise ValueError(f"{path}: expected a dict with keys imlist, qimlist, gnd")
    imlist, qimlist, gnd = list(data["imlist"]), list(data["qimlist"]), list(data["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: {len(gnd)} gnd entries for {len(qimlist)} queries")
    for q, g in enumerate(gnd):
        missing = [k for k in ("bbx", "easy", "hard", "junk") if k not in g]
        if missing:
            raise ValueError(f"{path}: gnd[{q}] lacks {missing}")
    part = [Item(src / "jpg" / f"{i}.jpg", str(i)) for i in imlist]
    query = [Item(src / "jpg" / f"{i}.jpg", str(i)) for i in qimlist]

    def ground_truth(index_maps):
        out = []
        for q, g in enumerate(gnd):
            if index_maps["query"][q] is None:
                continue
            where = f"{path}: gnd[{q}]"
            out.append({"bbx": [float(v) for v in g["bbx"]],
                        **{k: _remap(g[k], index_maps["part"], f"{where}.{k}") for k in ("easy", "hard", "junk")}})
        return {"type": "revisitop", "gnd": out}

    return Source(name, {"part": part, "query": query}, ground_truth)


# ---------------------------------------------------------------------------------- INSTRE

def _mat_strings(path, value, key):
    import numpy as np

    cells = np.asarray(value, dtype=object).ravel()
    out = []
    for c in cells:
        c = np.asarray(c).ravel()
        if c.size != 1 or not isinstance(c[0], str):
            raise ValueError(f"{path}: {key} must be a cell array of strings")
        out.append(str(c[0]))
    return out


def instre(src):
    """INSTRE: gnd_instre.mat (imlist, qimlist, gnd(q).ok 1-based, gnd(q).bbx [x1 y1 x2 y2]).

    Labels are the instance folder of each image (INSTRE-S1/01a_canada_book/...), numbered in
    order of first appearance in imlist. Queries are database images (the box crops them later).
    """
    import numpy as np
    import scipy.io

    path = src / "gnd_instre.mat"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground-truth file not found")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:
        raise ValueError(f"{path}: malformed .mat file: {type(e).__name__}: {e}") from None
    for key in ("imlist", "qimlist", "gnd"):
        if key not in mat:
            raise ValueError(f"{path}: no variable {key!r}")
    imlist = _mat_strings(path, mat["imlist"], "imlist")
    qimlist = _mat_strings(path, mat["qimlist"], "qimlist")
    gnd = np.asarray(mat["gnd"]).ravel()
    if gnd.dtype.names is None or not {"ok", "bbx"} <= set(gnd.dtype.names):
        raise ValueError(f"{path}: gnd must be a struct array with fields ok and bbx")
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: {len(gnd)} gnd entries for {len(qimlist)} queries")
    instances = {}
    for name in imlist + qimlist:
        instances.setdefault(str(Path(name).parent), len(instances))

    def item(name):
        return Item(src / name, str(Path(name).with_suffix("")), instances[str(Path(name).parent)])

    entries = []
    for q, g in enumerate(gnd):
        ok = np.asarray(g["ok"]).ravel().astype(np.int64)
        bbx = np.asarray(g["bbx"], dtype=np.float64).ravel()
        if bbx.size != 4:
            raise ValueError(f"{path}: gnd({q + 1}).bbx has {bbx.size} values, expected 4")
        if ok.size and ok.min() < 1:
            raise ValueError(f"{path}: gnd({q + 1}).ok holds {ok.min()}, but indices are 1-based")
        entries.append((bbx.tolist(), (ok - 1).tolist()))

    def ground_truth(index_maps):
        out = []
        for q, (bbx, ok) in enumerate(entries):
            if index_maps["query"][q] is not None:
                out.append({"bbx": bbx, "ok": _remap(ok, index_maps["part"], f"{path}: gnd({q + 1}).ok")})
        return {"type": "instre", "gnd": out}

    return Source("instre", {"part": [item(n) for n in imlist], "query": [item(n) for n in qimlist]},
                  ground_truth)


# ------------------------------------------------------------------- folders and list files

def revisitop1m(src):
    """R-1M distractors: revisitop1m.txt (paths relative to jpg/, with extension), else all of jpg/."""
    listing = src / "revisitop1m.txt"
    if listing.is_file():
        return image_folder("revisitop1m", listing, root=src / "jpg")
    if (src / "jpg").is_dir():
        return image_folder("revisitop1m", src / "jpg")
    raise FileNotFoundError(f"{listing}: not found (nor a jpg/ folder beside it)")


def image_folder(dataset, src, root=None):
    """Every image file under folder `src` (recursive, sorted by path), or the paths listed in
    text file `src` (one per line, relative to `root`, default the list's folder; blank and #
    lines skipped)."""
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
        root = src
    else:
        root = Path(root) if root is not None else src.parent
        try:
            lines = src.read_text().splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{src}: not a text list of image paths") from None
        paths = [root / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    items = []
    for p in paths:
        try:
            rel = p.relative_to(root)
        except ValueError:  # an absolute path in a list file
            rel = p
        items.append(Item(p, str(rel.with_suffix("")).replace("\\", "/")))
    return Source(dataset, {"part": items})
