"""insclr.features: extraction through the real streaming loader, gathering over torchrun ranks."""

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
from insclr.shard.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
SCALES = (1.0, 0.7071, 0.5)


@pytest.fixture(scope="module")
def shards(shards_dir):
    """The tiny synthetic ROxford database: 40 images in two shards (32 + 8), so each of two
    ranks reads across a shard boundary."""
    return shards_dir / "roxford5k"


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
    n = Manifest.load(shards).num_samples()
    loader = StreamLoader(shards, mode="square", size=64, batch_size=7)
    feats = extract(model, loader, SCALES, "cpu")
    assert feats.dtype == np.float16 and feats.shape == (n, 16)
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1, atol=2e-3)
    seen = 0
    with torch.no_grad():
        for images, indices in loader:
            want = multiscale_features(model, normalize(images), SCALES).numpy()
            np.testing.assert_allclose(feats[indices.numpy()], want, atol=2e-3)
            seen += len(indices)
    assert seen == n


def test_gather_rows_single_process_places_by_index():
    idx = torch.tensor([3, 0, 2, 1])
    feat = torch.arange(8, dtype=torch.float16).view(4, 2)
    out = gather_rows(idx, feat, 2)
    np.testing.assert_array_equal(out, np.array([[2, 3], [6, 7], [4, 5], [0, 1]], dtype=np.float16))
    with pytest.raises(ValueError, match=r"1 missing \[3\], 1 repeated \[2\]"):
        gather_rows(torch.tensor([0, 1, 2, 2]), feat, 2)


def test_float32_features_are_kept_float32():
    """The evaluation's default storage: float32 rows gathered as float32, values unchanged."""
    idx = torch.tensor([1, 0])
    feat = torch.tensor([[0.1234567, 1.0], [3.0, 1e-7]], dtype=torch.float32)
    out = gather_rows(idx, feat, 2, dtype=torch.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, feat.numpy()[[1, 0]])


def test_cli_errors_name_the_input(tmp_path, capsys):
    from insclr.features import main

    assert main(["--shards", str(tmp_path / "none"), "--model", "random", "--out", str(tmp_path / "f.npy")]) == 2
    assert f"shard folder not found: {tmp_path / 'none'}" in capsys.readouterr().err


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


@pytest.mark.cross_check
def test_one_and_two_processes_agree(shards, model_file, tmp_path):
    """The CLI under torchrun (gloo, 2 ranks with unequal parts) writes the same features."""
    args = ["-m", "insclr.features", "--shards", str(shards), "--model", str(model_file),
            "--size", "64", "--batch", "3", "--threads", "1"]
    _run([sys.executable, *args, "--out", str(tmp_path / "one" / "features.npy")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          *args, "--out", str(tmp_path / "two" / "features.npy")], tmp_path)
    one = np.load(tmp_path / "one" / "features.npy")
    two = np.load(tmp_path / "two" / "features.npy")
    n = Manifest.load(shards).num_samples()
    assert one.shape == two.shape == (n, 16) and one.dtype == np.float32  # --dtype float32, the default
    # the ranks batch the images differently (kernels may block differently): the float32 features
    # differ by a few units of float32 roundoff (2^-24 relative) accumulated over the network's sums,
    # far below 1e-5 on unit-norm rows
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "two" / "features.json").read_text())
    assert info["count"] == n and info["world_size"] == 2 and info["dtype"] == "float32"
    assert info["scales"] == pytest.approx([1.0, 2 ** -0.5, 0.5])
    assert info["size"] == 64 and info["arch"] == "resnet18" and info["seconds"] > 0


@pytest.mark.gpu
def test_cuda_fp16_extraction_matches_cpu(shards, model_file):
    from insclr.data import StreamLoader
    from insclr.model import load_model

    cpu = extract(load_model(str(model_file)), StreamLoader(shards, size=64, batch_size=8), SCALES, "cpu")
    dev = torch.device("cuda", 0)
    gpu = extract(load_model(str(model_file), device=dev),
                  StreamLoader(shards, size=64, batch_size=8, device=dev), SCALES, dev, amp="fp16")
    assert gpu.shape == cpu.shape
    # GPU decoding/resizing and fp16 autocast move the features a little, not the ranking
    cos = (gpu.astype(np.float32) * cpu.astype(np.float32)).sum(1)
    assert cos.min() > 0.99
