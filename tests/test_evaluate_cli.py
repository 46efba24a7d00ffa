"""End to end: python -m insclr.evaluate on the tiny synthetic shard sets; INSTRE .mat reading;
query crop semantics through StreamLoader."""

import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from insclr.evaluate import main
from insclr.evaluate.datasets import load_eval_set


def test_command_end_to_end(shards_dir, tmp_path):
    out, feats, js = tmp_path / "pics", tmp_path / "feats", tmp_path / "r.json"
    argv = ["--model", "random", "--arch", "resnet18", "--data", "roxford5k,instre,gldv2",
            "--shards-root", str(shards_dir), "--distractors", str(shards_dir / "revisitop1m"),
            "--size", "64", "--scales", "1", "--show", "2", "--out", str(out),
            "--save-features", str(feats), "--json", str(js), "--device", "cpu"]
    assert main(argv) == 0
    r = json.loads(js.read_text())["results"]
    ox = r["roxford5k+r1m"]
    n_ox = load_eval_set("roxford5k", shards_dir).database.num_samples("part")
    n_1m = json.loads((shards_dir / "revisitop1m" / "manifest.json").read_text())["num_samples"]
    assert ox["database"] == n_ox + n_1m            # distractors appended
    for k in ("mapE", "mapM", "mapH"):
        assert 0 <= ox[k] <= 1
    assert len(ox["mprM"]) == 3 and 0 <= r["instre"]["map"] <= 1
    assert r["gldv2"]["queries_public"] + r["gldv2"]["queries_private"] > 0
    # pictures: one row per query, thumb 128 + label
    im = Image.open(out / "roxford5k+r1m-retrieval.png")
    assert im.height == 2 * (128 + 18 + 4) + 4
    # distractor features cached beside the shards, set features saved; a rerun reuses them
    assert list((shards_dir / "revisitop1m").glob("features-*.npy"))
    saved = sorted(p.name for p in feats.glob("*.npy"))
    assert "roxford5k-database.npy" in saved and "instre-queries.npy" in saved
    mtime = (feats / "roxford5k-database.npy").stat().st_mtime_ns
    assert main(argv) == 0
    assert (feats / "roxford5k-database.npy").stat().st_mtime_ns == mtime
    assert json.loads(js.read_text())["results"]["roxford5k+r1m"]["mapM"] == ox["mapM"]


def test_bad_dataset_name_is_an_error(shards_dir):
    with pytest.raises(ValueError, match="unknown evaluation set 'oxford'"):
        load_eval_set("oxford", shards_dir)


def test_bad_inputs_fail_before_any_work(shards_dir, tmp_path, capsys):
    assert main(["--model", "random", "--data", "roxford5k,oxford", "--shards-root", str(shards_dir)]) == 2
    assert "error: unknown evaluation set 'oxford'" in capsys.readouterr().err
    assert main(["--model", "random", "--data", "roxford5k", "--shards-root", str(tmp_path)]) == 2
    assert f"error: shard folder not found: {tmp_path / 'roxford5k'}" in capsys.readouterr().err


def test_query_crop_through_stream_loader(shards_dir):
    """mode 'query': crop to the box (original-image coordinates), then scale by the factor the
    full image gets for longer side `size` (ALGORITHM §11)."""
    from insclr.data import StreamLoader

    es = load_eval_set("roxford5k", shards_dir)
    size = 48
    loader = StreamLoader(es.queries, split="query", mode="query", size=size)
    sizes, orig = es.queries.sizes("query"), es.queries.orig_sizes("query")
    for (images, idx), q in zip(loader, range(3)):
        x1, y1, x2, y2 = es.gnd[q]["bbx"]
        w, h = sizes[q]
        f = min(1.0, size / max(w, h))
        sx = w / orig[q][0]
        assert abs(images.shape[3] - (x2 - x1) * sx * f) <= 2
        assert abs(images.shape[2] - (y2 - y1) * sx * f) <= 2
        assert int(idx[0]) == q


def test_instre_mat_reader(tmp_path):
    """gnd_instre.mat: 1-based 'ok' indices into imlist, bbx [x1 y1 x2 y2] in pixels."""
    from insclr.shard.sources import instre

    root = tmp_path / "instre"
    (root / "S1").mkdir(parents=True)
    names = [f"S1/{i}.jpg" for i in range(6)]
    for n in names:
        Image.new("RGB", (40, 30), (90, 0, 0)).save(root / n)
    imlist = np.array([[np.array([n]) for n in names[:4]]], dtype=object)
    qimlist = np.array([[np.array([n]) for n in names[4:]]], dtype=object)
    gnd = np.zeros((1, 2), dtype=[("ok", object), ("bbx", object)])
    gnd[0, 0] = (np.array([[1, 3]], dtype=np.float64), np.array([[2, 3, 20, 25]], dtype=np.float64))
    gnd[0, 1] = (np.array([[4]], dtype=np.float64), np.array([[0, 0, 40, 30]], dtype=np.float64))
    scipy.io.savemat(root / "gnd_instre.mat", {"imlist": imlist, "qimlist": qimlist, "gnd": gnd})
    src = instre(root)
    gt = src.ground_truth({"part": list(range(4)), "query": [0, 1]})
    assert [g["ok"] for g in gt["gnd"]] == [[0, 2], [3]]
    assert gt["gnd"][0]["bbx"] == [2, 3, 20, 25]
