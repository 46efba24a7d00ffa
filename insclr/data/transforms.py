"""Small numerical helpers of the data path: normalisation and the random-resized-crop windows.

The crop windows are drawn here, in Python, from a numpy Generator (not inside DALI), so that
the augmentation of a step depends only on (seed, rank, step) and a resumed run sees exactly
the pixels an uninterrupted one would.
"""

import math

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_TRIES = 10  # torchvision.transforms.RandomResizedCrop.get_params tries this many windows


def normalize(images_uint8, channels_last=True):
    """uint8 [B,3,H,W] -> float32 [B,3,H,W], (x/255 - mean) / std with ImageNet statistics.

    Runs on the images' device (inside the training step on a GPU), so only uint8 crosses
    the host/device boundary. `channels_last` returns the result in torch.channels_last memory
    format (what the convolutions prefer); the loaders' uint8 output already has that layout.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"normalize expects uint8 [B,3,H,W], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images_uint8.to(dtype=torch.float32, memory_format=fmt)
    # Fold 1/255 into the std so that the whole normalisation is one multiply-add per pixel.
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255.0)
    return (x - mean).mul_(inv_std)


def rrc_windows(rng, sizes, scale, ratio=(3 / 4, 4 / 3)):
    """Crop windows of torchvision's RandomResizedCrop for R images, drawn from `rng`.

    sizes: int [R, 2] (width, height) of each image. Returns int64 [R, 4] (x, y, w, h).
    Same semantics as `RandomResizedCrop.get_params`, including area scales above 1: up to
    10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first window that
    fits is kept, its corner uniform over the valid positions; if none fits, the centre crop
    of the whole image with its aspect ratio clamped to `ratio`. All tries are drawn for every
    image (vectorised), so the number of draws per step is fixed.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    width, height = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
    r = len(sizes)
    area = width * height
    target = area * rng.uniform(scale[0], scale[1], size=(r, RRC_TRIES))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(r, RRC_TRIES)))
    # Python's round() (half to even) is what torchvision uses; np.rint matches it.
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u = rng.random(size=(r, 2))  # corner position, used only when a try fits
    first = fits.argmax(axis=1)
    found = fits[np.arange(r), first]
    out = np.zeros((r, 4), dtype=np.int64)
    cw, ch = w[np.arange(r), first], h[np.arange(r), first]
    W, H = sizes[:, 0], sizes[:, 1]
    out[:, 0] = np.minimum((u[:, 0] * (W - cw + 1)).astype(np.int64), W - cw)
    out[:, 1] = np.minimum((u[:, 1] * (H - ch + 1)).astype(np.int64), H - ch)
    out[:, 2], out[:, 3] = cw, ch
    if not found.all():
        out[~found] = _centre_windows(sizes[~found], ratio)
    return out


def _centre_windows(sizes, ratio):
    """torchvision's fallback: the whole image, aspect clamped to `ratio`, centred. [R,4] (x, y, w, h)."""
    out = np.zeros((len(sizes), 4), dtype=np.int64)
    for i, (W, H) in enumerate(sizes.tolist()):
        in_ratio = W / H
        if in_ratio < min(ratio):
            w, h = W, int(round(W / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(H * max(ratio))), H
        else:
            w, h = W, H
        out[i] = ((W - w) // 2, (H - h) // 2, w, h)
    return out


def step_rng(seed, rank, step):
    """The Generator of one step's augmentation: a function of (seed, rank, step) only."""
    return np.random.default_rng([int(seed), int(rank), int(step)])


def query_window(bbx, size, orig_size):
    """Integer crop window (x, y, w, h) in the stored JPEG of a box given in original-image pixels.

    bbx: (x1, y1, x2, y2) in the original image; size / orig_size: (w, h) of the stored and the
    original image (they differ when sharding re-encoded the image smaller). Coordinates are
    rounded like PIL's Image.crop and clipped to the image; the window is at least 1×1.
    """
    sx, sy = size[0] / orig_size[0], size[1] / orig_size[1]
    x1, y1 = int(round(bbx[0] * sx)), int(round(bbx[1] * sy))
    x2, y2 = int(round(bbx[2] * sx)), int(round(bbx[3] * sy))
    x1, x2 = min(max(x1, 0), size[0] - 1), min(max(x2, 0), size[0])
    y1, y2 = min(max(y1, 0), size[1] - 1), min(max(y2, 0), size[1])
    return x1, y1, max(x2 - x1, 1), max(y2 - y1, 1)


def longest_side_shape(width, height, size):
    """(w, h, factor): longer side `size`, downscale only, aspect kept, rounded half up (as the
    DALI pipeline computes it)."""
    f = min(1.0, size / max(width, height))
    return max(1, math.floor(width * f + 0.5)), max(1, math.floor(height * f + 0.5)), f
