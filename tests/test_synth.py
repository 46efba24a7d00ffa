"""insclr.synth: layouts read back with the real formats' readers, determinism, non-trivial retrieval."""

import csv
import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from insclr.synth import DATASETS, generate, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = generate(root, seed=0, scale="tiny")
    return root, summary


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != "synth.json"}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _check_image(path, max_side=480):
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.mode == "RGB", path
        assert 300 <= max(im.size) <= max_side, (path, im.size)
        return im.size


def test_summary_and_synth_json(tiny):
    root, summary = tiny
    assert list(summary) == list(DATASETS)
    saved = json.loads((root / "synth.json").read_text())
    assert saved["seed"] == 0 and saved["scale"] == "tiny" and saved["datasets"] == summary
    assert summary["roxford5k"]["images"] == 40 and summary["roxford5k"]["queries"] == 5


def test_gldv2_layout(tiny):
    root, summary = tiny
    g = root / "gldv2"
    rows = _rows(g / "train_clean.csv")
    assert rows[0] == ["landmark_id", "images"]
    landmarks = [int(r[0]) for r in rows[1:]]
    assert landmarks == sorted(landmarks) and len(set(landmarks)) == len(landmarks)
    counts = [len(r[1].split(" ")) for r in rows[1:]]
    assert min(counts) < 15 <= max(counts)  # the recipe's filter has something to drop
    ids = [i for r in rows[1:] for i in r[1].split(" ")]
    assert len(ids) == len(set(ids)) == summary["gldv2"]["train_images"]
    digests = {}
    for i in ids:
        assert re.fullmatch(r"[0-9a-f]{16}", i)
        path = g / "train" / i[0] / i[1] / i[2] / f"{i}.jpg"
        digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(i)
    assert any(len(v) > 1 for v in digests.values()), "expected exact duplicates under different ids"
    index = _rows(g / "index_image_to_landmark.csv")
    assert index[0] == ["id", "landmark_id"]
    index_ids = {r[0] for r in index[1:]}
    assert not set(int(r[1]) for r in index[1:]) & set(landmarks)  # retrieval landmarks are new ones
    for i in index_ids:
        _check_image(g / "index" / i[0] / i[1] / i[2] / f"{i}.jpg")
    solution = _rows(g / "retrieval_solution_v2.1.csv")
    assert solution[0] == ["id", "images", "Usage"]
    usages = {r[2] for r in solution[1:]}
    assert usages == {"Public", "Private", "Ignored"}
    for test_id, images, usage in solution[1:]:
        _check_image(g / "test" / test_id[0] / test_id[1] / test_id[2] / f"{test_id}.jpg")
        if usage == "Ignored":
            assert images == "None"
        else:
            assert images.split(" ") and set(images.split(" ")) <= index_ids


@pytest.mark.parametrize("dataset", ["roxford5k", "rparis6k"])
def test_revisitop_layout(tiny, dataset):
    root, _ = tiny
    with open(root / dataset / f"gnd_{dataset}.pkl", "rb") as f:
        cfg = pickle.load(f)
    assert set(cfg) == {"imlist", "qimlist", "gnd"} and len(cfg["gnd"]) == len(cfg["qimlist"])
    n = len(cfg["imlist"])
    assert len(set(cfg["imlist"]) | set(cfg["qimlist"])) == n + len(cfg["qimlist"])
    for name in cfg["imlist"]:
        assert re.fullmatch(r"[a-z_]+_\d{6}", name)
        _check_image(root / dataset / "jpg" / f"{name}.jpg")
    for name, g in zip(cfg["qimlist"], cfg["gnd"]):
        w, h = _check_image(root / dataset / "jpg" / f"{name}.jpg")
        x1, y1, x2, y2 = g["bbx"]
        assert all(isinstance(v, float) for v in g["bbx"])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        sets = [set(g[k]) for k in ("easy", "hard", "junk")]
        assert all(0 <= i < n for s in sets for i in s)
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert sets[1] and sets[2]
    assert sum(not g["easy"] for g in cfg["gnd"]) >= 1  # some queries have no easy positive


def test_instre_layout(tiny):
    root, _ = tiny
    mat = scipy.io.loadmat(root / "instre" / "gnd_instre.mat")
    imlist = [str(x[0]) for x in mat["imlist"][0]]
    qimlist = [str(x[0]) for x in mat["qimlist"][0]]
    gnd = mat["gnd"][0]
    assert gnd.dtype.names == ("ok", "bbx") and len(gnd) == len(qimlist) == 5 and len(imlist) == 40
    assert not set(imlist) & set(qimlist)
    for path in imlist + qimlist:
        assert re.fullmatch(r"INSTRE-(S1|S2|M)/\d\d[ab]?_\w+/\d{3}\.jpg", path)
        _check_image(root / "instre" / path)
        boxes = (root / "instre" / path).with_suffix(".txt").read_text().split("\n")
        assert len([b for b in boxes if b]) == (2 if path.startswith("INSTRE-M") else 1)
    for q, g in enumerate(gnd):
        ok = g[0].ravel()  # MATLAB indices: 1-based
        assert ok.size and ok.min() >= 1 and ok.max() <= len(imlist)
        folder = qimlist[q].rsplit("/", 1)[0]
        assert {imlist[i - 1].rsplit("/", 1)[0] for i in ok} >= {folder}
        x1, y1, x2, y2 = g[1].ravel()
        with Image.open(root / "instre" / qimlist[q]) as im:
            assert 0 <= x1 < x2 <= im.size[0] and 0 <= y1 < y2 <= im.size[1]
    s1a = qimlist.index(next(p for p in qimlist if p.startswith("INSTRE-S1/01a")))
    assert any(imlist[i - 1].startswith("INSTRE-M/") for i in gnd[s1a][0].ravel())  # pairs count as positives


def test_revisitop1m_layout(tiny):
    root, _ = tiny
    names = (root / "revisitop1m" / "revisitop1m.txt").read_text().split()
    assert len(names) == len(set(names)) == 20
    for name in names:
        _check_image(root / "revisitop1m" / "jpg" / name)


def test_deterministic_and_independent_of_workers(tiny, tmp_path):
    root, _ = tiny
    generate(tmp_path / "again", seed=0, scale="tiny", datasets=["roxford5k", "instre"], workers=2)
    for dataset in ("roxford5k", "instre"):
        assert _digests(tmp_path / "again" / dataset) == _digests(root / dataset)
    generate(tmp_path / "other", seed=1, scale="tiny", datasets=["roxford5k"])
    other, same = _digests(tmp_path / "other" / "roxford5k"), _digests(root / "roxford5k")
    assert set(other.values()).isdisjoint(set(same.values()))


def _colour_descriptor(img):
    """Hellinger-normalised 4x4x4 RGB histogram [64]."""
    a = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int64) // 64
    h = np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64).astype(np.float64)
    h = np.sqrt(h / h.sum())
    return h / np.linalg.norm(h)


def test_colour_alone_does_not_solve_retrieval(tiny):
    """Same-instance images are more alike than others, yet a colour histogram is far from perfect mAP."""
    root, _ = tiny
    aps, same, other = [], [], []
    for dataset in ("roxford5k", "rparis6k"):
        with open(root / dataset / f"gnd_{dataset}.pkl", "rb") as f:
            cfg = pickle.load(f)
        db = np.stack([_colour_descriptor(Image.open(root / dataset / "jpg" / f"{n}.jpg")) for n in cfg["imlist"]])
        for name, g in zip(cfg["qimlist"], cfg["gnd"]):
            query = Image.open(root / dataset / "jpg" / f"{name}.jpg").crop([int(v) for v in g["bbx"]])
            scores = db @ _colour_descriptor(query)
            positives, junk = set(g["easy"]) | set(g["hard"]), set(g["junk"])
            ranking = [i for i in np.argsort(-scores, kind="stable") if i not in junk]
            ranks = np.array([r for r, i in enumerate(ranking) if i in positives])
            aps.append(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1)))
            same += [scores[i] for i in positives]
            other += [scores[i] for i in range(len(scores)) if i not in positives | junk]
    assert np.mean(same) > np.mean(other) + 0.02
    assert np.mean(aps) < 0.7


def test_cli(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "r1m"), "--datasets", "revisitop1m", "--seed", "3"]) == 0
    assert "revisitop1m" in capsys.readouterr().out
    assert len((tmp_path / "r1m" / "revisitop1m" / "revisitop1m.txt").read_text().split()) == 20
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path / "x"), "--datasets", "oxford"])
    assert "unknown dataset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown scale"):
        generate(tmp_path / "y", scale="huge")
