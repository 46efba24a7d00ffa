"""insclr.model: GeM, heads, multi-scale features, initialisation and model files."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from insclr.config import ModelConfig
from insclr.model import (Head, build_model, gem, l2n, load_model, multiscale_features,
                          save_model)


def small_cfg(**kw):
    return dataclasses.replace(ModelConfig(arch="resnet18", head="norm_linear_norm", dim=32,
                                           init="random"), **kw)


def test_gem_closed_form():
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1
    want = (x.numpy() ** 3).mean(axis=(2, 3)) ** (1 / 3)
    np.testing.assert_allclose(gem(x).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(gem(x, p=1).numpy(), x.numpy().mean(axis=(2, 3)), rtol=1e-12)
    # values below eps are clamped: an all-negative map pools to eps
    assert torch.allclose(gem(-x, eps=1e-6), torch.full((2, 3), 1e-6, dtype=torch.float64))


def test_l2n_is_f_normalize_and_self_similarity_clears_the_positive_cut():
    # float64: F.normalize divides by max(norm, 1e-12), so a row's self-similarity is 1 to rounding;
    # x / (norm + 1e-6) would leave it near 1 - 2e-6, under the loss's cut 1 - 1e-6 (ALGORITHM §6).
    x = torch.randn(64, 32, dtype=torch.float64)
    torch.testing.assert_close(l2n(x), F.normalize(x, dim=1), rtol=0, atol=0)
    self_sim = (l2n(x) * l2n(x)).sum(dim=1)
    assert (self_sim > 1 - 1e-6).all()
    # float32 too: rounding is a few ulps (1e-7 each), far above 1e-6 below 1
    x32 = x.float()
    assert ((l2n(x32) * l2n(x32)).sum(dim=1) > 1 - 1e-6).all()
    assert torch.equal(l2n(torch.zeros(1, 4)), torch.zeros(1, 4))  # the clamp keeps zero rows finite


def test_learnable_gem_p_trains_and_is_saved(tmp_path):
    cfg = small_cfg(gem_p="learn", head="linear_norm", dim=8)
    model = build_model(cfg)
    assert isinstance(model.pool.p, torch.nn.Parameter) and model.pool.p.item() == 3.0
    assert "pool.p" in model.state_dict()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1
    np.testing.assert_allclose(gem(x, torch.tensor([3.0], dtype=torch.float64)).numpy(),
                               gem(x, 3.0).numpy(), rtol=1e-12)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.pool.p.grad is not None and model.pool.p.grad.abs().item() > 0
    with torch.no_grad():
        model.pool.p.fill_(2.5)
    save_model(model, cfg, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert back.pool.p.item() == 2.5


def test_heads():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    nln = Head("norm_linear_norm", 16, 8)
    want = l2n(l2n(x) @ nln.linear.weight.T)
    assert nln.linear.bias is None and nln.out_dim == 8
    torch.testing.assert_close(nln(x), want)
    ln = Head("linear_norm", 16, 8)
    torch.testing.assert_close(ln(x), l2n(x @ ln.linear.weight.T + ln.linear.bias))
    norm = Head("norm", 16, 8)
    assert norm.out_dim == 16
    torch.testing.assert_close(norm(x).norm(dim=1), torch.ones(4))
    ident = Head("identity", 16, 8)
    assert ident(x) is x and ident.out_dim == 16
    with pytest.raises(ValueError, match="model.head 'bogus'"):
        Head("bogus", 16, 8)


@pytest.mark.parametrize("arch,head,dim,out", [("resnet18", "norm_linear_norm", 32, 32),
                                               ("resnet34", "linear_norm", 16, 16),
                                               ("resnet50", "identity", 8, 2048),
                                               ("resnet18", "norm", 8, 512)])
def test_build_shapes(arch, head, dim, out):
    model = build_model(small_cfg(arch=arch, head=head, dim=dim)).eval()
    assert model.out_dim == out
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 48)).shape == (2, out)


def test_random_init_is_seeded_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(small_cfg())
    assert torch.rand(1) == before
    b = build_model(small_cfg())
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_multiscale_average():
    model = build_model(small_cfg(head="identity")).eval()
    x = torch.randn(2, 3, 64, 64)
    scales = (1.0, 0.7071, 0.5)
    with torch.no_grad():
        got = multiscale_features(model, x, scales)
        parts = [model(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                       if s != 1 else x) for s in scales]
        assert parts[1].shape == (2, 512)
        want = l2n(sum(parts) / 3)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(multiscale_features(model, x, (1.0,)), l2n(model(x)))


def test_imagenet_missing_file_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        build_model(small_cfg(arch="resnet50", init="imagenet"))
    msg = str(e.value)
    assert "resnet50-19c8e357.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "https://download.pytorch.org/models/resnet50-19c8e357.pth" in msg
    with pytest.raises(FileNotFoundError, match="model.weights.*nothere.pth"):
        build_model(small_cfg(init="imagenet", weights=str(tmp_path / "nothere.pth")))


def test_unreadable_model_file_is_a_short_error(tmp_path):
    np.save(tmp_path / "features.npy", np.zeros((2, 3), np.float16))    # a pickle-like file, not a model
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + bytes(100))      # a truncated zip
    for name, detail in (("features.npy", "Weights only load failed."), ("cut.pt", "PytorchStreamReader")):
        with pytest.raises(ValueError) as e:
            load_model(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: not a readable model file") and detail in str(e.value)
        assert "arbitrary code execution" not in str(e.value)


def test_imagenet_loads_trunk_from_hub_cache_and_path(tmp_path, monkeypatch):
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None)
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), folder / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for cfg in (small_cfg(init="imagenet"),
                small_cfg(init="imagenet", weights=str(folder / "resnet18-f37072fd.pth"))):
        model = build_model(cfg)
        assert torch.equal(model.trunk.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
        assert torch.equal(model.trunk.bn1.running_var, reference.bn1.running_var)


def test_save_and_load_model_file(tmp_path):
    cfg = small_cfg(head="linear_norm", dim=24)
    model = build_model(cfg)
    with torch.no_grad():
        model.head.linear.bias.fill_(0.25)
    path = tmp_path / "out" / "model.pt"
    save_model(model, cfg, path)
    loaded = load_model(str(path))
    assert loaded.out_dim == 24 and torch.equal(loaded.head.linear.bias, model.head.linear.bias)
    via_cfg = build_model(dataclasses.replace(cfg, init=str(path)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(via_cfg.eval()(x), model.eval()(x))
    # a full checkpoint from DDP/compile: prefixed keys are accepted
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_config": dataclasses.asdict(cfg), "step": 3}, tmp_path / "ck.pt")
    assert torch.equal(load_model(tmp_path / "ck.pt").head.linear.bias, model.head.linear.bias)


def test_checkpoint_mismatch_lists_keys(tmp_path):
    cfg = small_cfg()
    path = tmp_path / "model.pt"
    save_model(build_model(cfg), cfg, path)
    with pytest.raises(ValueError, match=r"model.pt.*missing keys: head.linear.bias"):
        build_model(small_cfg(head="linear_norm", dim=32, init=str(path)))
    with pytest.raises(ValueError, match=r"shape mismatches: head.linear.weight"):
        build_model(small_cfg(dim=16, init=str(path)))
    with pytest.raises(ValueError, match="unexpected keys: head.linear.weight"):
        build_model(small_cfg(head="norm", init=str(path)))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(str(tmp_path / "none.pt"))
