"""Reading and applying a whitening file (W.npz of `python -m insclr.whiten`).

A stand-in with the interface of insclr.whiten's `load_whitening` / `apply_whitening` (the W.npz
contract: `mean` float [D], `projection` float [D_out, D], optional `renormalize`), for the
consumers here (search, export) until that module is on main; then they import it instead.
A descriptor x [N, D] becomes l2n((x - mean) @ projection.T) [N, D_out].
"""

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Whitening:
    mean: np.ndarray          # float32 [D]
    projection: np.ndarray    # float32 [D_out, D]
    renormalize: bool = True  # L2-normalise the output

    @property
    def dim(self):
        return self.projection.shape[0]


def load_whitening(path):
    """W.npz -> Whitening; ValueError / FileNotFoundError naming the file and the bad array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"whitening file not found: {path} (make it with python -m insclr.whiten)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"mean", "projection"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a whitening file, missing arrays {sorted(missing)}")
            mean, projection = z["mean"], z["projection"]
            renormalize = bool(z["renormalize"]) if "renormalize" in z.files else True
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable whitening .npz (python -m insclr.whiten): {e}") from None
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0]:
        raise ValueError(f"{path}: mean {mean.shape} and projection {projection.shape} must be [D] and [d, D]")
    if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
        raise ValueError(f"{path}: mean or projection is not finite")
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), renormalize)


def whitening_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def apply_whitening(x, w, eps=1e-6):
    """x float [N, D]: torch tensor -> float32 tensor on its device, numpy -> float32 numpy;
    (x - mean) @ projection.T, L2-normalised when w.renormalize."""
    if x.shape[-1] != w.mean.shape[0]:
        raise ValueError(f"whitening expects {w.mean.shape[0]}-d features, got {x.shape[-1]}-d")
    if torch.is_tensor(x):
        mean = torch.as_tensor(w.mean, device=x.device)
        proj = torch.as_tensor(w.projection, device=x.device)
        y = (x.float() - mean) @ proj.T
        return y / (y.norm(dim=-1, keepdim=True) + eps) if w.renormalize else y
    y = (np.asarray(x, dtype=np.float32) - w.mean) @ w.projection.T
    return y / (np.linalg.norm(y, axis=1, keepdims=True) + eps) if w.renormalize else y
