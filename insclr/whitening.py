"""Reading and applying a learnt whitening (W.npz of `python -m insclr.whiten`).

W.npz holds `mean` float [D] and `proj` float [D_out, D]; a descriptor x [N, D] becomes
l2n((x - mean) @ proj.T) [N, D_out]. One loader for every consumer (search, export).
"""

import hashlib
from pathlib import Path

import numpy as np
import torch


def load_whitening(path):
    """-> (mean float32 [D], proj float32 [D_out, D]) of a W.npz; ValueError naming the file and
    the key when it is missing, not finite or of the wrong shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"whitening file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k], dtype=np.float32) for k in ("mean", "proj") if k in data}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a whitening .npz ({e})") from None
    for key in ("mean", "proj"):
        if key not in arrays:
            raise ValueError(f"{path}: no key {key!r} (a whitening file holds 'mean' and 'proj')")
        if not np.isfinite(arrays[key]).all():
            raise ValueError(f"{path}: key {key!r} holds NaN or infinite values")
    mean, proj = arrays["mean"], arrays["proj"]
    if mean.ndim != 1 or proj.ndim != 2 or proj.shape[1] != mean.shape[0]:
        raise ValueError(f"{path}: 'mean' {mean.shape} and 'proj' {proj.shape} do not fit "
                         f"(expected [D] and [D_out, D])")
    return mean, proj


def whitening_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_dim(mean, dim, path):
    if mean.shape[0] != dim:
        raise ValueError(f"{path}: whitening of {mean.shape[0]}-d descriptors, the model gives {dim}-d")


def apply_whitening(x, mean, proj, eps=1e-6):
    """x float [N, D] (numpy or torch) -> L2-normalised float32 [N, D_out] = l2n((x - mean) @ proj.T)."""
    if torch.is_tensor(x):
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
        proj_t = torch.as_tensor(proj, dtype=torch.float32, device=x.device)
        y = (x.float() - mean_t) @ proj_t.T
        return y / (y.norm(dim=-1, keepdim=True) + eps)
    y = (np.asarray(x, dtype=np.float32) - mean) @ proj.T
    return y / (np.linalg.norm(y, axis=1, keepdims=True) + eps)
