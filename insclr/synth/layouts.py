"""Per-dataset plans and writers: which images to photograph, and the metadata files in each real layout.

Each `write_<dataset>(root, seed, cfg, render)` plans its images as (relative path, view spec) jobs,
has `render(jobs)` photograph them (returns (size, boxes) per job, in job order), then writes the
dataset's own ground-truth files. Image ids, names and view choices come from generators seeded by
(seed, dataset, ...), so the plan is the same whatever else is generated.
"""

import csv
import io
import pickle

import numpy as np
import scipy.io

from insclr.io import atomic_path
from insclr.synth.render import rng_for

OXFORD = ["all_souls", "ashmolean", "balliol", "bodleian", "christ_church", "cornmarket", "hertford", "keble",
          "magdalen", "pitt_rivers", "radcliffe_camera"]
PARIS = ["paris_defense", "paris_eiffel", "paris_invalides", "paris_louvre", "paris_moulinrouge",
         "paris_museedorsay", "paris_notredame", "paris_pantheon", "paris_pompidou", "paris_sacrecoeur",
         "paris_triomphe"]
OBJECTS = ["book", "toy", "mug", "logo", "poster", "box", "bottle", "sign", "card", "badge"]


def _write_csv(path, header, rows):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)


def _write_instances(path, names, instances):
    _write_csv(path, ["name", "instance"], zip(names, instances))


def _hex_ids(seed, what, n, digits):
    """n distinct lower-case hex ids of `digits` characters."""
    rng = rng_for(seed, what, "ids")
    ids, seen = [], set()
    while len(ids) < n:
        h = rng.bytes(digits // 2).hex()
        if h not in seen:
            seen.add(h)
            ids.append(h)
    return ids


def _spec(view, objects, difficulty, cfg, others):
    return {"view": view, "objects": list(objects), "difficulty": difficulty, "sides": tuple(cfg["sides"]),
            "others": tuple(others)}


# GLDv2 train photographs: difficulty -> probability (a scale's gldv2 "train_mix" replaces it).
TRAIN_MIX = {"easy": 0.55, "hard": 0.3, "junk": 0.05, "crop": 0.1}


def _train_difficulty(rng, mix):
    return str(rng.choice(list(mix), p=list(mix.values())))


def _gldv2_path(split, image_id):
    return f"gldv2/{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _gldv2_train_plan(seed, cfg, landmark_ids):
    """Jobs and (landmark_id, [ids]) rows of the training set, with near and exact duplicates."""
    g = cfg["gldv2"]
    rng = rng_for(seed, "gldv2", "train-plan")
    mix = g.get("train_mix", TRAIN_MIX)
    counts = [int(rng.integers(g["big"][0], g["big"][1] + 1)) for _ in range(g["big_landmarks"])]
    counts += [int(rng.integers(g["few"][0], g["few"][1] + 1)) for _ in range(g["few_landmarks"])]
    order = rng.permutation(len(counts))  # landmarks with few images are spread among the others
    ids = iter(_hex_ids(seed, "gldv2-train", sum(counts), 16))
    others = tuple(f"gldv2-clutter/{j}" for j in range(g["clutter"]))
    jobs, rows = [], []
    for k, li in enumerate(order):
        lid = int(landmark_ids[li])
        key = f"gldv2/{lid}"
        specs = [_spec(f"gldv2/train/{lid}/{j}", [key], _train_difficulty(rng, mix), cfg, others) for j in range(counts[li])]
        for j in range(1, len(specs)):
            r = rng.random()
            # Exact duplicates (same view, so same bytes) and near-duplicates (same view, re-saved);
            # the first two landmarks always get one of each so every scale has both kinds.
            if r < g["dup_rate"] or (k == 0 and j == len(specs) - 1):
                specs[j] = dict(specs[0])
            elif r < 2 * g["dup_rate"] or (k == 1 and j == len(specs) - 1):
                specs[j] = dict(specs[0], variant=j)
        image_ids = [next(ids) for _ in specs]
        jobs += [(_gldv2_path("train", i), s) for i, s in zip(image_ids, specs)]
        rows.append((lid, image_ids))
    rows.sort()
    return jobs, rows


def write_gldv2(root, seed, cfg, render):
    g = cfg["gldv2"]
    n_train = g["big_landmarks"] + g["few_landmarks"]
    landmark_ids = rng_for(seed, "gldv2", "landmark-ids").choice(203094, n_train + g["index_landmarks"], replace=False)
    jobs, rows = _gldv2_train_plan(seed, cfg, landmark_ids[:n_train])
    # Retrieval split: new landmarks (as in the real index/test), same generator family.
    rng = rng_for(seed, "gldv2", "retrieval-plan")
    others = tuple(f"gldv2-clutter/{j}" for j in range(g["clutter"]))
    index_lids = [int(x) for x in landmark_ids[n_train:]]
    index_ids = _hex_ids(seed, "gldv2-index", len(index_lids) * g["index_per"], 16)
    index_rows, by_landmark = [], {}
    for n, image_id in enumerate(index_ids):
        lid = index_lids[n // g["index_per"]]
        diff = str(rng.choice(["easy", "hard"], p=[0.7, 0.3]))
        jobs.append((_gldv2_path("index", image_id), _spec(f"gldv2/index/{n}", [f"gldv2-r/{lid}"], diff, cfg, others)))
        index_rows.append((image_id, lid))
        by_landmark.setdefault(lid, []).append(image_id)
    test_ids = _hex_ids(seed, "gldv2-test", g["test_queries"] + g["test_ignored"], 16)
    solution = []
    for n, image_id in enumerate(test_ids):
        if n < g["test_queries"]:
            lid = index_lids[n % len(index_lids)]
            spec = _spec(f"gldv2/test/{n}", [f"gldv2-r/{lid}"], "query", cfg, others)
            solution.append((image_id, " ".join(by_landmark[lid]), "Public" if rng.random() < 0.5 else "Private"))
        else:  # no landmark of the index: an unrelated object, or clutter only
            objects = [f"gldv2-unrelated/{n}"] if rng.random() < 0.6 else []
            spec = _spec(f"gldv2/test/{n}", objects, "easy", cfg, others)
            solution.append((image_id, "None", "Ignored"))
        jobs.append((_gldv2_path("test", image_id), spec))
    render(jobs)
    _write_csv(root / "gldv2/train_clean.csv", ["landmark_id", "images"], [(l, " ".join(i)) for l, i in rows])
    _write_csv(root / "gldv2/index_image_to_landmark.csv", ["id", "landmark_id"], index_rows)
    _write_csv(root / "gldv2/retrieval_solution_v2.1.csv", ["id", "images", "Usage"], solution)
    counts = [len(i) for _, i in rows]
    return {"train_images": sum(counts), "train_landmarks": len(rows),
            "train_landmarks_ge15": sum(c >= 15 for c in counts),
            "train_images_ge15": sum(c for c in counts if c >= 15),
            "index_images": len(index_ids), "test_images": len(test_ids), "test_queries": g["test_queries"]}


def _numbered_names(rng, prefix, n, taken):
    """n new names prefix_NNNNNN (6 digits, as the real sets number their images)."""
    names = []
    while len(names) < n:
        name = f"{prefix}_{int(rng.integers(0, 1_000_000)):06d}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def write_revisitop(root, seed, cfg, render, dataset):
    """roxford5k / rparis6k: gnd_<dataset>.pkl (imlist, qimlist, gnd with bbx/easy/hard/junk) and jpg/."""
    r = cfg["revisitop"]
    landmarks = (OXFORD if dataset == "roxford5k" else PARIS)[:r["landmarks"]]
    generic = "oxford" if dataset == "roxford5k" else "paris_general"
    rng = rng_for(seed, dataset, "plan")
    others = tuple(f"{dataset}-clutter/{j}" for j in range(r["clutter"]))
    taken, db, queries = set(), [], []  # db: (name, instance, difficulty); queries: (name, landmark index)
    for k, lm in enumerate(landmarks):
        # The last landmark has no easy images: its queries have no easy positives (as a few real ones).
        counts = dict(easy=r["easy"], hard=r["hard"], junk=r["junk"])
        if k == len(landmarks) - 1:
            counts = dict(easy=0, hard=r["easy"] + r["hard"], junk=r["junk"])
        for diff, n in counts.items():
            db += [(name, f"{dataset}/{lm}", diff) for name in _numbered_names(rng, lm, n, taken)]
        queries += [(name, k) for name in _numbered_names(rng, lm, r["queries_per_landmark"], taken)]
    # Distractors: other instances of the same families (never queried), and clutter-only photographs.
    for name in _numbered_names(rng, generic, r["distractors"], taken):
        j = int(rng.integers(r["distractor_instances"]))
        inst = f"{dataset}-other/{j}" if rng.random() < 0.8 else ""
        db.append((name, inst, str(rng.choice(["easy", "hard"]))))
    db.sort()  # a directory listing: landmark images interleaved with distractors
    jobs = [(f"{dataset}/jpg/{n}.jpg", _spec(f"{dataset}/{n}", [i] if i else [], d, cfg, others)) for n, i, d in db]
    jobs += [(f"{dataset}/jpg/{n}.jpg", _spec(f"{dataset}/{n}", [f"{dataset}/{landmarks[k]}"], "query", cfg, others))
             for n, k in queries]
    results = render(jobs)
    gnd = []
    for q, (name, k) in enumerate(queries):
        inst = f"{dataset}/{landmarks[k]}"
        entry = {"bbx": [float(v) for v in results[len(db) + q][1][0]]}
        for diff in ("easy", "hard", "junk"):
            entry[diff] = [i for i, (_, inst_i, d) in enumerate(db) if inst_i == inst and d == diff]
        gnd.append(entry)
    cfg_pkl = {"imlist": [n for n, _, _ in db], "qimlist": [n for n, _ in queries], "gnd": gnd}
    with atomic_path(root / dataset / f"gnd_{dataset}.pkl") as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(cfg_pkl, f)
    _write_instances(root / dataset / "synth_instances.csv", [n for n, _, _ in db] + [n for n, _ in queries],
                     [i for _, i, _ in db] + [f"{dataset}/{landmarks[k]}" for _, k in queries])
    return {"images": len(db), "queries": len(queries),
            "queries_without_easy": sum(not g["easy"] for g in gnd)}


def _instre_classes(cfg):
    """[(subset, folder, instance keys)]: S1 classes in a/b pairs, S2 classes, M = the S1 pairs together."""
    n = cfg["instre"]
    classes = []
    for p in range(1, n["pairs"] + 1):
        for ab in "ab":
            name = OBJECTS[(2 * p + (ab == "b")) % len(OBJECTS)]
            classes.append(("INSTRE-S1", f"{p:02d}{ab}_{name}", [f"instre/{p}{ab}"]))
    for c in range(1, n["s2_classes"] + 1):
        classes.append(("INSTRE-S2", f"{c:02d}_{OBJECTS[c % len(OBJECTS)]}", [f"instre/s2-{c}"]))
    for p in range(1, n["pairs"] + 1):
        classes.append(("INSTRE-M", f"{p:02d}_pair", [f"instre/{p}a", f"instre/{p}b"]))
    return classes


def _savemat_deterministic(path, variables):
    """scipy.io.savemat, with the 116-byte header text fixed: savemat stamps the time there, and the
    same seed must give the same bytes."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables)
    data = bytearray(buf.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: insclr.synth".ljust(116, b" ")
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(data))


def write_instre(root, seed, cfg, render):
    """gnd_instre.mat (imlist, qimlist, gnd.ok 1-based, gnd.bbx [x1 y1 x2 y2]) and the INSTRE folders."""
    n = cfg["instre"]
    rng = rng_for(seed, "instre", "plan")
    others = tuple(f"instre-clutter/{j}" for j in range(n["clutter"]))
    classes = _instre_classes(cfg)
    jobs, owner = [], []  # owner: class index per job
    for c, (subset, folder, keys) in enumerate(classes):
        for j in range(1, n["per_class"] + 1):
            diff = str(rng.choice(["query", "easy", "hard"], p=[0.3, 0.45, 0.25]))
            spec = _spec(f"instre/{folder}/{j}", keys, diff, cfg, others)
            jobs.append((f"instre/{subset}/{folder}/{j:03d}.jpg", spec))
            owner.append(c)
    results = render(jobs)
    for (path, _), (_, boxes) in zip(jobs, results):  # INSTRE's per-image "x y w h" box files
        lines = [f"{round(x0)} {round(y0)} {round(x1 - x0)} {round(y1 - y0)}\n" for x0, y0, x1, y1 in boxes]
        with atomic_path(root / path.replace(".jpg", ".txt")) as tmp:
            tmp.write_text("".join(lines))
    # The first `queries_per_class` images of every class are its queries; they leave the database.
    is_query = [int(path.rsplit("/", 1)[1][:3]) <= n["queries_per_class"] for path, _ in jobs]
    db = [i for i in range(len(jobs)) if not is_query[i]]
    position = {i: p for p, i in enumerate(db)}
    qs = [i for i in range(len(jobs)) if is_query[i]]
    gnd = np.zeros((1, len(qs)), dtype=[("ok", object), ("bbx", object)])
    for q, i in enumerate(qs):
        subset, folder, keys = classes[owner[i]]
        ok = [position[d] + 1 for d in db if owner[d] == owner[i] or  # MATLAB indices start at 1
              (subset == "INSTRE-S1" and classes[owner[d]][0] == "INSTRE-M" and keys[0] in classes[owner[d]][2])]
        boxes = np.array(results[i][1])
        gnd[0, q] = (np.array([ok], dtype=np.int32),
                     np.array([[*boxes[:, :2].min(0), *boxes[:, 2:].max(0)]], dtype=np.float64))
    cell = lambda paths: np.array([[p[len("instre/"):] for p in paths]], dtype=object)  # noqa: E731
    _savemat_deterministic(root / "instre/gnd_instre.mat", {
        "imlist": cell([jobs[i][0] for i in db]), "qimlist": cell([jobs[i][0] for i in qs]), "gnd": gnd})
    _write_instances(root / "instre/synth_instances.csv", [p[len("instre/"):] for p, _ in jobs],
                     [classes[c][1] for c in owner])
    return {"images": len(db), "queries": len(qs), "classes": len(classes)}


def write_revisitop1m(root, seed, cfg, render):
    """revisitop1m.txt (paths relative to jpg/) and jpg/<hh>/<id>.jpg: distractors, no eval instance."""
    m = cfg["revisitop1m"]
    rng = rng_for(seed, "revisitop1m", "plan")
    others = tuple(f"r1m-clutter/{j}" for j in range(m["clutter"]))
    names, jobs, instances = [], [], []
    for n, h in enumerate(_hex_ids(seed, "revisitop1m", m["images"], 32)):
        inst = f"r1m/{int(rng.integers(m['instances']))}" if rng.random() < 0.7 else ""
        names.append(f"{h[:2]}/{h}.jpg")
        instances.append(inst)
        jobs.append((f"revisitop1m/jpg/{names[-1]}",
                     _spec(f"revisitop1m/{n}", [inst] if inst else [], str(rng.choice(["easy", "hard"])), cfg, others)))
    render(jobs)
    with atomic_path(root / "revisitop1m/revisitop1m.txt") as tmp:
        tmp.write_text("".join(f"{n}\n" for n in names))
    _write_instances(root / "revisitop1m/synth_instances.csv", names, instances)
    return {"images": len(names)}


WRITERS = {
    "gldv2": write_gldv2,
    "roxford5k": lambda root, seed, cfg, render: write_revisitop(root, seed, cfg, render, "roxford5k"),
    "rparis6k": lambda root, seed, cfg, render: write_revisitop(root, seed, cfg, render, "rparis6k"),
    "instre": write_instre,
    "revisitop1m": write_revisitop1m,
}
