"""python -m insclr.shard: readers, validation/conversion, round trips (webdataset, DALI), resume."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shard_fixtures as fx
from insclr.shard import main, shard_dataset, verify
from insclr.shard.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def read_wds(manifest, split="part"):
    """[(key, jpg bytes, meta dict)] of a split, read with the webdataset library."""
    import webdataset as wds

    urls = [str(s.tar) for s in manifest.shards(split)]
    return [(s["__key__"], s["jpg"], json.loads(s["json"])) for s in wds.WebDataset(urls, shardshuffle=False)]


def read_dali(manifest, split="part"):
    """[(jpg bytes, meta dict)] of a split, read with DALI's webdataset reader on the CPU (index files)."""
    from nvidia.dali import fn, pipeline_def

    shards = manifest.shards(split)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, meta = fn.readers.webdataset(paths=[str(s.tar) for s in shards], index_paths=[str(s.idx) for s in shards],
                                          ext=["jpg", "json"], name="reader", random_shuffle=False)
        return jpg, meta

    p = pipe()
    p.build()
    out = []
    for _ in range(p.epoch_size("reader")):
        jpg, meta = p.run()
        out.append((np.array(jpg[0]).tobytes(), json.loads(np.array(meta[0]).tobytes())))
    return out


def tree_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.name != "manifest.json"}


# ------------------------------------------------------------------------------ bad inputs

def test_every_kind_of_bad_input(tmp_path):
    inputs = fx.bad_inputs()
    src = fx.make_folder(tmp_path / "src", inputs)
    manifest = shard_dataset("folder", src / "list.txt", tmp_path / "out", per_shard=4, max_pixels=50_000)
    reasons = {r["id"]: r["reason"] for r in manifest.data["rejected"]}
    assert reasons["images/missing"] == "missing file"
    accepted = manifest.ids()
    for name, (data, expected) in inputs.items():
        key = "images/" + Path(name).stem
        if expected in ("keep", "convert"):
            assert key in accepted, (name, reasons.get(key))
        else:
            assert expected in reasons[key], (name, reasons[key])
    assert len(accepted) + len(reasons) == len(inputs) + 1  # every input exactly once
    samples = read_wds(manifest)
    assert [m["index"] for _, _, m in samples] == list(range(len(accepted)))
    for key, jpg, meta in samples:
        name = next(n for n in inputs if "images/" + Path(n).stem == meta["id"])
        data, expected = inputs[name]
        image = Image.open(io.BytesIO(jpg))
        assert image.format == "JPEG" and image.mode == "RGB" and not image.info.get("progressive")
        assert list(image.size) == meta["size"] == manifest.sizes()[meta["index"]].tolist()
        assert (jpg == data) == (expected == "keep"), name
    rotated = manifest.ids().index("images/rotated")
    assert manifest.sizes()[rotated].tolist() == [40, 30]  # EXIF orientation 6 not applied: stored pixels
    assert manifest.data["options"]["exif_transpose"] is False
    gray16 = np.asarray(Image.open(io.BytesIO(samples[manifest.ids().index("images/gray16")][1])))
    assert gray16.shape == (30, 40, 3) and gray16.max() > 200  # 16-bit range mapped onto 8 bits
    assert verify(tmp_path / "out") == []


def test_exif_transpose_rotates_the_pixels_and_is_recorded(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    pixels = fx.noise(40, 30, 5)
    src = fx.make_folder(tmp_path / "src", {"rotated.jpg": (fx.jpeg_bytes(pixels, exif=exif.tobytes()), "")})
    kept = shard_dataset("folder", src / "images", tmp_path / "kept")
    turned = shard_dataset("folder", src / "images", tmp_path / "turned", exif_transpose=True)
    assert kept.sizes().tolist() == [[40, 30]] and turned.sizes().tolist() == [[30, 40]]
    assert kept.data["options"]["exif_transpose"] is False and turned.data["options"]["exif_transpose"] is True
    assert "--exif-transpose" in turned.data["created_by"]["command"] and kept.identity != turned.identity
    # the loaders decode the stored pixels as Pillow opens them (never rotated): the original's reading
    from insclr.data import StreamLoader

    ((image, _),) = list(StreamLoader(kept, mode="longest", size=1000))
    stored = np.asarray(Image.open(io.BytesIO(read_wds(kept)[0][1])).convert("RGB"))
    assert np.array_equal(image[0].permute(1, 2, 0).numpy(), stored)
    ((image, _),) = list(StreamLoader(turned, mode="longest", size=1000))
    assert tuple(image.shape[2:]) == (40, 30)


@pytest.mark.parametrize("dataset", ["roxford5k", "instre"])
def test_exif_transpose_refused_for_sets_with_boxes(tmp_path, dataset):
    with pytest.raises(ValueError, match="--exif-transpose: .* query boxes"):
        shard_dataset(dataset, tmp_path, tmp_path / "out", exif_transpose=True)


def test_max_side_reencodes_only_large_images(tmp_path):
    big, small = fx.jpeg_bytes(fx.noise(100, 50, 1)), fx.jpeg_bytes(fx.noise(40, 30, 2))
    src = fx.make_folder(tmp_path / "src", {"big.jpg": (big, ""), "small.jpg": (small, "")})
    manifest = shard_dataset("folder", src / "images", tmp_path / "out", max_side=64)
    assert manifest.ids() == ["big", "small"]
    assert manifest.sizes().tolist() == [[64, 32], [40, 30]]
    assert manifest.orig_sizes().tolist() == [[100, 50], [40, 30]]
    (_, jpg_big, _), (_, jpg_small, _) = read_wds(manifest)
    assert jpg_small == small and Image.open(io.BytesIO(jpg_big)).size == (64, 32)


# --------------------------------------------------------------------- readers, round trips

def test_revisitop_round_trip_with_webdataset_and_dali(tmp_path):
    src = fx.make_revisitop(tmp_path, n_db=10, n_query=3, bad_db=(3,), bad_query=(1,))
    manifest = shard_dataset("roxford5k", src, tmp_path / "out", per_shard=3)
    assert manifest.splits == ["part", "query"]
    db_ids = [f"all_souls_{i:06d}" for i in range(10) if i != 3]
    assert manifest.ids("part") == db_ids
    assert manifest.ids("query") == ["query_000000", "query_000002"]
    assert [len(manifest.shards("part")), len(manifest.shards("query"))] == [3, 1]
    rejected = {(r["split"], r["id"]): r for r in manifest.data["rejected"]}
    assert set(rejected) == {("part", "all_souls_000003"), ("query", "query_000001")}
    assert rejected[("part", "all_souls_000003")]["source"] == "jpg/all_souls_000003.jpg"
    # Ground truth: database indices remapped past the rejected image 3, the rejected query dropped.
    gnd = manifest.ground_truth()
    assert gnd["type"] == "revisitop" and len(gnd["gnd"]) == 2
    dense = {old: new for new, old in enumerate(i for i in range(10) if i != 3)}
    for q, entry in zip((0, 2), gnd["gnd"]):
        assert entry["bbx"] == [1.5, 2.0, 30.0, 40.0 + q]
        assert entry["easy"] == [dense[0], dense[q + 4]] and entry["hard"] == [dense[5], dense[6]]
        assert entry["junk"] == [dense[9]]
    for split in ("part", "query"):
        originals = [(src / "jpg" / f"{i}.jpg").read_bytes() for i in manifest.ids(split)]
        wds_samples = read_wds(manifest, split)
        dali_samples = read_dali(manifest, split)
        assert [k for k, _, _ in wds_samples] == [f"{i:09d}" for i in range(len(originals))]
        assert [j for _, j, _ in wds_samples] == originals == [j for j, _ in dali_samples]
        metas = [m for _, _, m in wds_samples]
        assert metas == [m for _, m in dali_samples]
        assert [m["id"] for m in metas] == manifest.ids(split)
        assert [m["size"] for m in metas] == manifest.sizes(split).tolist() == [m["orig_size"] for m in metas]
    assert verify(tmp_path / "out") == []


def test_gldv2_min_images_labels_and_missing_files(tmp_path):
    src = fx.make_gldv2(tmp_path, landmarks=((7, 4), (3, 2), (12, 5)), missing=1)
    manifest = shard_dataset("gldv2", src, tmp_path / "out", min_images=3, per_shard=4)
    assert manifest.num_samples() == 8  # 4 + 5 listed by kept landmarks, minus one missing file
    assert manifest.labels().tolist() == [7, 7, 7, 12, 12, 12, 12, 12]
    assert [r["reason"] for r in manifest.data["rejected"]] == ["missing file"]
    assert manifest.data["rejected"][0]["source"].startswith("train/0/0/0/")
    assert manifest.data["notes"]["landmarks_below_min_images"] == 1
    assert [m["label"] for _, _, m in read_wds(manifest)] == manifest.labels().tolist()


def test_instre_reads_one_based_ok_and_corner_boxes(tmp_path):
    src = fx.make_instre(tmp_path)
    manifest = shard_dataset("instre", src, tmp_path / "out")
    assert manifest.ids("query") == ["INSTRE-S1/01a_book/100", "INSTRE-S2/01_cup/100"]
    assert manifest.labels("part").tolist() == [0, 0, 0, 1, 1, 1] and manifest.labels("query").tolist() == [0, 1]
    gnd = manifest.ground_truth()
    assert gnd == {"type": "instre", "gnd": [{"bbx": [2.0, 3.0, 20.0, 30.0], "ok": [0, 1, 2]},
                                             {"bbx": [0.0, 1.0, 40.0, 39.0], "ok": [3, 4, 5]}]}


@pytest.mark.parametrize("dataset,damage", [
    ("gldv2", lambda d: (d / "train_clean.csv").unlink()),
    ("gldv2", lambda d: (d / "train_clean.csv").write_text("landmark,imgs\n1,abc\n")),
    ("gldv2", lambda d: (d / "train_clean.csv").write_text("landmark_id,images\nseven,abcdef\n")),
    ("roxford5k", lambda d: (d / "gnd_roxford5k.pkl").write_bytes(b"not a pickle")),
    ("roxford5k", lambda d: (d / "gnd_roxford5k.pkl").unlink()),
    ("instre", lambda d: (d / "gnd_instre.mat").write_bytes(b"MATLAB garbage")),
])
def test_missing_or_malformed_list_files_are_clear_errors(tmp_path, capsys, dataset, damage):
    make = {"gldv2": fx.make_gldv2, "roxford5k": fx.make_revisitop, "instre": fx.make_instre}[dataset]
    src = make(tmp_path)
    damage(src)
    listed = {"gldv2": "train_clean.csv", "roxford5k": "gnd_roxford5k.pkl", "instre": "gnd_instre.mat"}[dataset]
    assert main([dataset, "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert listed in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


# -------------------------------------------------------------------------------- resume

def test_resume_is_byte_identical_and_workers_do_not_change_bytes(tmp_path):
    src = fx.make_revisitop(tmp_path / "src", n_db=12, n_query=2, bad_db=(0, 5, 11), bad_query=())
    reference = shard_dataset("roxford5k", src, tmp_path / "a", per_shard=3)
    shard_dataset("roxford5k", src, tmp_path / "b", per_shard=3, workers=2)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    # Simulate a crash: the last part shard lost its tar (its record and idx remain), the
    # second-to-last lost its record, stray temporaries lie around, no manifest yet.
    b = tmp_path / "b"
    (b / "part-000002.tar").unlink()
    (b / "part-000001.json").unlink()
    (b / "manifest.json").unlink()
    (b / "part-000003.tar.tmp").write_bytes(b"partial")
    (b / ".manifest.json.x1y2.tmp").write_bytes(b"partial")
    again = shard_dataset("roxford5k", src, b, per_shard=3)
    assert tree_bytes(tmp_path / "a") == tree_bytes(b)
    assert again.data["splits"] == reference.data["splits"]
    assert again.data["rejected"] == reference.data["rejected"]
    with pytest.raises(ValueError, match="other inputs or options"):
        shard_dataset("roxford5k", src, b, per_shard=4)


def test_kill_and_resume_in_a_subprocess(tmp_path):
    # Enough work (and a slow decode per image) that the run is still going when shard 0 appears.
    inputs = {f"{i:03d}.jpg": (fx.jpeg_bytes(fx.noise(384, 384, i)), "") for i in range(48)}
    inputs["031.jpg"] = (b"", "")
    src = fx.make_folder(tmp_path / "src", inputs) / "images"
    cmd = [sys.executable, "-m", "insclr.shard", "folder", "--src", str(src), "--per-shard", "4"]
    env = dict(os.environ, INSCLR_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, env=env, cwd=ROOT)
    killed_mid_run = False
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, cwd=ROOT)
        while proc.poll() is None and not (out / "part-000000.tar").exists():
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / "manifest.json").exists():
            killed_mid_run = True
            break
        shutil.rmtree(out)
    assert killed_mid_run, "the run always finished before it could be killed"
    assert main(["folder", "--src", str(src), "--per-shard", "4", "--out", str(out)]) == 0
    assert tree_bytes(tmp_path / "whole") == tree_bytes(out)
    manifest = Manifest.load(out)
    assert manifest.ids() == [f"{i:03d}" for i in range(48) if i != 31]
    assert [r["id"] for r in manifest.data["rejected"]] == ["031"]
    assert not list(out.glob("*.tmp")) and verify(out) == []


# --------------------------------------------------------------------- the shared fixtures

def test_synthetic_sets_shard_cleanly(synth_dir, shards_dir):
    for name in ("gldv2", "gldv2-index", "gldv2-test", "roxford5k", "rparis6k", "instre", "revisitop1m"):
        assert verify(shards_dir / name) == [], name
        manifest = Manifest.load(shards_dir / name)
        assert manifest.data["rejected"] == [] and manifest.num_samples() > 0
    gnd = Manifest.load(shards_dir / "gldv2-test").ground_truth()
    index_ids = set(Manifest.load(shards_dir / "gldv2-index").ids())
    assert gnd["type"] == "gldv2" and all(set(g["index_ids"]) <= index_ids for g in gnd["gnd"])
    assert {g["usage"] for g in gnd["gnd"]} <= {"Public", "Private", "Ignored"}
    train = Manifest.load(shards_dir / "gldv2")
    labels = train.labels()
    assert len(train.shards()) > 1 and (np.bincount(labels[labels >= 0]) >= 15).sum() == len(set(labels.tolist()))
    instre = Manifest.load(shards_dir / "instre")
    assert len(instre.ground_truth()["gnd"]) == instre.num_samples("query")
    # The DALI reader sees every sample of a multi-shard split exactly once.
    assert sorted(m["index"] for _, m in read_dali(train)) == list(range(train.num_samples()))


def test_shard_writer_bytes_equal_tarfile(tmp_path, monkeypatch):
    """The direct USTAR writer produces exactly what Python's tarfile writes, and a matching index;
    its running sha256 is the tar's, also with background fdatasyncs while it writes."""
    import hashlib
    import tarfile

    from insclr.shard import writer
    from insclr.shard.writer import ShardWriter, _tarinfo, parse_index

    monkeypatch.setattr(writer, "SYNC_EVERY", 4096)

    samples = [(f"{i:09d}", {"jpg": bytes([i]) * (100 * i + 1), "json": b"{}" * i}) for i in range(30)]
    with ShardWriter(tmp_path / "ours") as w:
        for key, members in samples:
            w.write(key, members)
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    data = (tmp_path / "ours.tar").read_bytes()
    assert data == (tmp_path / "ref.tar").read_bytes()
    assert w.sha256 == hashlib.sha256(data).hexdigest()
    for (key, members), entry in zip(samples, parse_index(tmp_path / "ours.idx")):
        for ext, blob in members.items():
            offset, size, name = entry[ext]
            assert name == f"{key}.{ext}" and data[offset:offset + size] == blob


def test_worker_pool_gives_the_inline_results(tmp_path):
    from insclr.shard.build import Options, convert_all

    src = fx.make_folder(tmp_path, fx.bad_inputs())
    paths = sorted((src / "images").iterdir()) + [src / "images" / "missing.jpg"]
    inline = list(convert_all(paths, Options(workers=0, max_pixels=50_000)))
    pooled = list(convert_all(paths, Options(workers=2, max_pixels=50_000, chunk=2, min_pool_inputs=0)))
    assert pooled == inline and sum(r[4] is not None for r in inline) == 6


def test_worker_verdict_of_a_file_that_changed_is_validated_again(tmp_path):
    """Workers send no bytes for inputs kept as they are; the main process re-reads the file and
    checks its crc, and converts the file again when it changed in between."""
    from insclr.shard.build import _convert, _init_worker, _resolve, _verdict

    _init_worker(None, 50_000)
    src = fx.make_folder(tmp_path, fx.bad_inputs())
    paths = sorted((src / "images").iterdir())
    kept = [p for p in paths if _verdict(str(p))[5] is not None]
    assert kept and all(_resolve(p, _verdict(str(p))) == _convert(p) for p in paths)
    verdict = _verdict(str(kept[0]))
    assert verdict[0] is None and verdict[4] is None  # no bytes, no rejection: size and crc only
    kept[0].write_bytes(b"not an image any more")
    assert _resolve(kept[0], verdict) == _convert(kept[0]) == (None, None, None, 0, "not an image (unrecognised format)")
