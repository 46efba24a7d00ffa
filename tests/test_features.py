"""insclr.features: extraction through the real streaming loader, gathering over torchrun ranks."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from insclr.config import ModelConfig
from insclr.features import extract, gather_rows, parse_scales
from insclr.model import build_model, multiscale_features, save_model
from insclr.shard.writer import ShardWriter, sample_key, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SCALES = (1.0, 0.7071, 0.5)


def make_shards(root, counts=(5, 4, 3), seed=0):
    """A tiny shard folder per docs/formats.md: random JPEGs of varied sizes, uneven shards."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shards, ids, labels, sizes, first = [], [], [], [], 0
    for s, count in enumerate(counts):
        stem = root / f"part-{s:06d}"
        with ShardWriter(stem) as w:
            for i in range(first, first + count):
                wh = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
                pixels = rng.integers(0, 256, size=(wh[1] // 8, wh[0] // 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).resize(wh).save(buf, format="JPEG", quality=90)
                meta = {"index": i, "id": f"img{i}", "label": i % 3, "size": list(wh), "orig_size": list(wh)}
                w.write(sample_key(i), {"jpg": buf.getvalue(), "json": json.dumps(meta).encode()})
                ids.append(f"img{i}"), labels.append(i % 3), sizes.append(list(wh))
        shards.append({"tar": stem.name + ".tar", "idx": stem.name + ".idx", "count": count, "first": first,
                       "sha256": sha256_file(f"{stem}.tar"), "idx_sha256": sha256_file(f"{stem}.idx")})
        first += count
    manifest = {"format": "insclr-shards/1", "dataset": "folder",
                "created_by": {"command": ["tests"], "version": "0"},
                "options": {"max_side": None, "shard_size_mb": 1024, "per_shard": None},
                "num_samples": first,
                "splits": {"part": {"num_samples": first, "shards": shards, "ids": ids, "labels": labels,
                                    "sizes": sizes, "orig_sizes": sizes}},
                "rejected": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    cfg = ModelConfig(arch="resnet18", head="norm_linear_norm", dim=16, init="random")
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(build_model(cfg), cfg, path)
    return path


def test_extract_in_index_order(shards, model_file):
    from insclr.data import StreamLoader, normalize
    from insclr.model import load_model

    model = load_model(str(model_file)).eval()
    loader = StreamLoader(shards, mode="square", size=64, batch_size=5)
    feats = extract(model, loader, SCALES, "cpu")
    assert feats.dtype == np.float16 and feats.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1, atol=2e-3)
    seen = 0
    with torch.no_grad():
        for images, indices in loader:
            want = multiscale_features(model, normalize(images), SCALES).numpy()
            np.testing.assert_allclose(feats[indices.numpy()], want, atol=2e-3)
            seen += len(indices)
    assert seen == 12


def test_gather_rows_single_process_places_by_index():
    idx = torch.tensor([3, 0, 2, 1])
    feat = torch.arange(8, dtype=torch.float16).view(4, 2)
    out = gather_rows(idx, feat, 2)
    np.testing.assert_array_equal(out, np.array([[2, 3], [6, 7], [4, 5], [0, 1]], dtype=np.float16))
    with pytest.raises(ValueError, match=r"1 missing \[3\], 1 repeated \[2\]"):
        gather_rows(torch.tensor([0, 1, 2, 2]), feat, 2)


def test_parse_scales():
    assert parse_scales("1,0.5") == (1.0, 0.5)
    with pytest.raises(ValueError, match="--scales"):
        parse_scales("1,x")
    with pytest.raises(ValueError, match="--scales"):
        parse_scales("0,1")


def _run(cmd, tmp_path):
    env = dict(os.environ, INSCLR_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_and_two_processes_agree(shards, model_file, tmp_path):
    """The CLI under torchrun (gloo, 2 ranks with unequal parts) writes the same features."""
    args = ["-m", "insclr.features", "--shards", str(shards), "--model", str(model_file),
            "--size", "64", "--batch", "2", "--threads", "1"]
    _run([sys.executable, *args, "--out", str(tmp_path / "one" / "features.npy")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          *args, "--out", str(tmp_path / "two" / "features.npy")], tmp_path)
    one = np.load(tmp_path / "one" / "features.npy")
    two = np.load(tmp_path / "two" / "features.npy")
    assert one.shape == two.shape == (12, 16) and one.dtype == np.float16
    np.testing.assert_allclose(one.astype(np.float32), two.astype(np.float32), atol=1e-3)
    info = json.loads((tmp_path / "two" / "features.json").read_text())
    assert info["count"] == 12 and info["world_size"] == 2 and info["scales"] == [1.0, 0.7071, 0.5]
    assert info["size"] == 64 and info["arch"] == "resnet18" and info["seconds"] > 0
