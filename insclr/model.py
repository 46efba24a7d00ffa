"""The retrieval model (ALGORITHM §1): ResNet trunk up to layer4, GeM pooling, a small head.

Pure functions (`gem`, `l2n`, `multiscale_features`) carry the numerics; the modules are thin
wrappers. Model files (OUT/model.pt, and the "model" entry of full checkpoints) are dicts
{"model": state_dict, "model_config": dict of ModelConfig fields}; `save_model` writes one,
`load_model` / `build_model(init=PATH)` read one with `weights_only=True`.
"""

import dataclasses
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from insclr.config import ModelConfig
from insclr.io import save_torch

URL_ROOT = "https://download.pytorch.org/models/"
# arch -> (trunk output channels, torchvision V1 weight files; the first is the one we ask for).
# The second name is the same V1 weights as torchvision >= 0.13 names them.
ARCHS = {
    "resnet18": (512, ("resnet18-f37072fd.pth",)),
    "resnet34": (512, ("resnet34-b627a593.pth",)),
    "resnet50": (2048, ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth")),
    "resnet101": (2048, ("resnet101-5d3b4d8f.pth", "resnet101-63fe2227.pth")),
}
HEADS = ("norm_linear_norm", "linear_norm", "norm", "identity")
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
RANDOM_SEED = 0


# ----------------------------------------------------------------------------- pure functions


def gem(x, p=3.0, eps=1e-6):
    """Generalised-mean pooling: [B, C, H, W] -> [B, C] = mean_hw(clamp(x, eps)^p)^(1/p).

    p: a float, or a learnable 1-element tensor (model.gem_p=learn).
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(x):
    """Row-wise L2 normalisation x / max(‖x‖, 1e-12) (F.normalize, as the original): [B, D] -> [B, D].

    A row's similarity with itself is 1 to float rounding; with `x / (‖x‖ + eps)` it would be about
    1 - 2 eps, under the loss's positive cut 1 - 1e-6 (ALGORITHM §6), so self-pairs would count.
    """
    return F.normalize(x, p=2.0, dim=-1, eps=1e-12)


def multiscale_features(model, images, scales):
    """ALGORITHM §2: average the model output over rescaled inputs, then L2-normalise.

    images: float normalised [B, 3, H, W]; scales: e.g. (1, 1/sqrt(2), 1/2).
    Returns float32 [B, D]. The caller sets eval mode, no_grad and autocast.
    """
    total = None
    for s in scales:
        x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear",
                                                 align_corners=False)
        out = model(x).float()
        total = out if total is None else total + out
    return l2n(total / len(scales))


# ----------------------------------------------------------------------------- modules


LEARN_P_INIT = 3.0  # the original's learnable GeM starts at p = 3


class GeM(nn.Module):
    """GeM pooling with a fixed p (a float), or p="learn": a parameter `p` [1] initialised at 3,
    trained with the rest and saved in the state_dict (the original's GMP.P <= 0)."""

    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.eps = eps
        if p == "learn":
            self.p = nn.Parameter(torch.full((1,), LEARN_P_INIT))
        else:
            self.p = float(p)

    def forward(self, x):
        return gem(x, self.p, self.eps)

    def extra_repr(self):
        p = "learn" if isinstance(self.p, nn.Parameter) else self.p
        return f"p={p}, eps={self.eps}"


class Head(nn.Module):
    """norm_linear_norm: L2 -> Linear (no bias) -> L2; linear_norm: Linear (bias) -> L2;
    norm: L2; identity: nothing. [B, C] -> [B, out_dim]."""

    def __init__(self, kind, in_dim, dim):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"model.head {kind!r} is not one of {HEADS}")
        self.kind = kind
        linear = kind in ("norm_linear_norm", "linear_norm")
        self.linear = nn.Linear(in_dim, dim, bias=kind == "linear_norm") if linear else None
        self.out_dim = dim if linear else in_dim

    def forward(self, x):
        if self.kind == "identity":
            return x
        if self.kind == "norm_linear_norm":
            x = l2n(x)
        if self.linear is not None:
            x = self.linear(x)
        return l2n(x)


class RetrievalModel(nn.Module):
    """trunk (ResNet up to layer4) -> GeM -> head. forward: [B, 3, H, W] -> [B, out_dim]."""

    def __init__(self, arch="resnet101", head="norm_linear_norm", dim=2048, gem_p=3.0):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch {arch!r} is not one of {sorted(ARCHS)}")
        resnet = getattr(torchvision.models, arch)(weights=None)
        self.trunk = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in TRUNK_LAYERS))
        self.pool = GeM(gem_p)
        self.head = Head(head, ARCHS[arch][0], dim)
        self.arch = arch
        self.out_dim = self.head.out_dim

    def forward(self, x):
        return self.head(self.pool(self.trunk(x)))


# ----------------------------------------------------------------------------- weights


def imagenet_weight_file(arch, weights=""):
    """Path of torchvision's V1 ImageNet weight file for `arch`: `weights` if given, else the
    torch hub cache ($TORCH_HOME/hub/checkpoints). Raises FileNotFoundError saying what to fetch."""
    names = ARCHS[arch][1]
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"model.weights: ImageNet weight file not found: {weights} "
                                    f"(download {URL_ROOT}{names[0]} and point model.weights at it)")
        return Path(weights)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"ImageNet weights for {arch} not found: no {' or '.join(names)} in {folder}. "
        f"Download {URL_ROOT}{names[0]} into {folder} (or set TORCH_HOME, or set model.weights "
        f"to the file's path).")


def load_imagenet_trunk(model, path):
    """Load a torchvision ResNet state_dict (fc dropped) into `model.trunk`."""
    from insclr.safe_load import torch_load

    state = torch_load(path, what="ImageNet weight file")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _load_checked(model.trunk, state, path)


def _strip_prefixes(state):
    """DDP ("module.") and torch.compile ("_orig_mod.") prefixes are not part of the model."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _load_checked(module, state, source):
    """load_state_dict with an error that lists missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def some(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = [f"missing keys: {some(missing)}" if missing else "",
                 f"unexpected keys: {some(unexpected)}" if unexpected else "",
                 f"shape mismatches: {some(shapes)}" if shapes else ""]
        raise ValueError(f"{source}: weights do not fit the model ("
                         + "; ".join(p for p in parts if p) + ")")
    module.load_state_dict(state)


def check_finite_weights(state, source):
    """Raise ValueError naming `source` and the first tensor of `state` holding NaN or infinity."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: weights {name!r} hold NaN or infinite values (a diverged run?); "
                             f"not loaded")


def read_model_file(path):
    """-> (state_dict, model_config dict or None) of a model file or full checkpoint; refused when
    it is not one, could run code (insclr.safe_load), or holds NaN weights."""
    from insclr.safe_load import torch_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    data = torch_load(path, what="model file")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state_dict "
                         f"(written by insclr.model.save_model or training)")
    check_finite_weights(data["model"], path)
    return _strip_prefixes(data["model"]), data.get("model_config")


# ----------------------------------------------------------------------------- build / save / load


def build_model(cfg: ModelConfig, seed=RANDOM_SEED):
    """The model described by `cfg`, initialised by cfg.init: imagenet | random | checkpoint path.

    Random parts (all of `random`, the head of `imagenet`) come from `seed`, without touching
    the global RNG, so every rank builds the same model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RetrievalModel(cfg.arch, cfg.head, cfg.dim, cfg.gem_p)
    if cfg.init == "imagenet":
        load_imagenet_trunk(model, imagenet_weight_file(cfg.arch, cfg.weights))
    elif cfg.init != "random":
        state, _ = read_model_file(cfg.init)
        _load_checked(model, state, cfg.init)
    return model


def save_model(model, cfg_model, path):
    """Write {"model": state_dict, "model_config": fields of cfg_model} to `path` atomically."""
    model = getattr(model, "module", model)       # DDP wrapper
    model = getattr(model, "_orig_mod", model)    # torch.compile wrapper
    cfg = dataclasses.asdict(cfg_model) if dataclasses.is_dataclass(cfg_model) else dict(cfg_model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch({"model": state, "model_config": cfg}, path)


def load_model(spec, arch=None, head=None, dim=None, device="cpu"):
    """spec: imagenet | random | PATH of a model file. For imagenet/random, arch and dim default
    to ModelConfig's and head to 'identity' (stage 0); for PATH they come from its model_config."""
    if spec in ("imagenet", "random"):
        cfg = ModelConfig(init=spec, head="identity")
        updates = {k: v for k, v in (("arch", arch), ("head", head), ("dim", dim)) if v is not None}
        cfg = dataclasses.replace(cfg, **updates)
    else:
        state, stored = read_model_file(spec)
        if not isinstance(stored, dict):
            raise ValueError(f"{spec}: model file has no 'model_config' (arch/head/dim unknown)")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in stored.items() if k in known})
        model = build_model(dataclasses.replace(cfg, init="random", weights=""))
        _load_checked(model, state, os.fspath(spec))
        return model.to(device)
    return build_model(cfg).to(device)
