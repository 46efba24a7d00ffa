"""python -m insclr.export: the exported descriptor (TorchScript; ONNX run with onnxruntime on the
CPU) against the evaluation path (normalize + multiscale_features + whitening) at image sizes
other than the traced one, batched; the command's check and its errors."""

import json

import numpy as np
import pytest
import torch

from insclr.data import normalize
from insclr.export import Descriptor, export, main, run_exported
from insclr.model import load_model, multiscale_features
from insclr.whiten import Whitening, apply_whitening

SCALES = (1.0, 0.7071)
# float32 throughout; onnxruntime's convolutions sum in another order than torch's: a few ulps
# (1e-7) per layer on the activations, far below 1e-4 on unit-norm descriptors.
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return load_model("random", "resnet18", "linear_norm", 32)


def _whitening(dim=32, out=16):
    rng = np.random.default_rng(0)
    return Whitening(rng.normal(size=dim).astype(np.float32) * 0.05, rng.normal(size=(out, dim)).astype(np.float32),
                     "pca")


def _reference(model, images, whitening):
    with torch.no_grad():
        f = multiscale_features(model.eval(), normalize(images, channels_last=False), SCALES)
    return apply_whitening(f, whitening).numpy() if whitening else f.numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_matches_the_evaluation_path(model, tmp_path, fmt):
    whitening = _whitening()
    path = tmp_path / f"m.{fmt}"
    descriptor, diff = export(model, SCALES, fmt, path, whitening)
    assert diff <= TOL
    images = torch.randint(0, 256, (2, 3, 72, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    got = run_exported(fmt, path, [images])[0]
    assert got.shape == (2, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(model, images, whitening), atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_command_random_model(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["--model", "random", "--arch", "resnet18", "--format", "onnx", "--out", str(out),
                 "--scales", "1,0.5"]) == 0
    printed = capsys.readouterr().out
    assert "largest difference to PyTorch" in printed
    info = json.loads((tmp_path / "m.onnx.json").read_text())
    assert info["max_difference"] <= TOL and info["output"].startswith("float32 [B, 512]")


def test_command_errors(tmp_path, capsys):
    w = tmp_path / "W.npz"
    np.savez(w, mean=np.zeros(100, np.float32), projection=np.zeros((8, 100), np.float32))
    rc = main(["--model", "random", "--arch", "resnet18", "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
               "--whiten", str(w)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "100-d descriptors, the model gives 512-d" in err[0]
    rc = main(["--model", str(tmp_path / "none.pt"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and "model file not found" in capsys.readouterr().err


def test_descriptor_without_whitening_is_the_model(model):
    images = torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = Descriptor(model.eval(), SCALES)(images).numpy()
    # the same CPU kernels; only the pixel normalisation is written differently (a few ulps)
    np.testing.assert_allclose(got, _reference(model, images, None), atol=1e-6)
