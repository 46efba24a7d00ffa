"""Small numerical helpers of the data path: normalisation and the random-resized-crop windows.

The crop windows are drawn here, in Python, from a numpy Generator (not inside DALI), so that
the augmentation of a step depends only on (seed, rank, step) and a resumed run sees exactly
the pixels an uninterrupted one would.
"""

import ctypes
import math
import sys

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
    device = images_uint8.device
    # One float buffer, converted into and normalised in place: a second temporary of the
    # size of the batch (x - mean) cost as much as the arithmetic on the CPU.
    x = torch.empty(images_uint8.shape, dtype=torch.float32, device=device, memory_format=fmt)
    if device.type == "cpu":
        advise_hugepages(x)
    x.copy_(images_uint8)
    # Fold 1/255 into the std so that the whole normalisation is one multiply-add per pixel.
    # (non_blocking: `torch.tensor(..., device=cuda)` would wait for the GPU to finish its queue)
    mean = torch.tensor(IMAGENET_MEAN).to(device, non_blocking=True) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD).to(device, non_blocking=True) * 255.0)
    if channels_last:
        # NHWC memory: broadcasting a [1,3,1,1] statistic over an innermost dimension of 3
        # does not vectorise (the CPU kernel was ~4x slower than the conversion). As rows of
        # W pixels with the statistics tiled to W*3 the inner loop is long and contiguous;
        # the arithmetic per element is the same.
        b, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).view(b * h, w * 3)
        rows.sub_(mean.repeat(w)).mul_(inv_std.repeat(w))
        return x
    return x.sub_(mean.view(1, 3, 1, 1)).mul_(inv_std.view(1, 3, 1, 1))


_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>
_HUGE = 1 << 21      # x86-64 / arm64 transparent huge page size
_libc = None


def advise_hugepages(t, min_bytes=8 << 20):
    """Ask Linux to back a freshly allocated (untouched) CPU tensor with transparent huge pages.

    A batch of float images is hundreds of MB; first-touch faults on 4 KiB pages cost about as
    much as the normalisation itself on the development VM (200 MB: ~90 ms of faults vs ~20 ms
    with 2 MiB pages). Advisory only: does nothing where THP is off ("never"), off Linux, or for
    small tensors; the contents and semantics of the tensor are unchanged.
    """
    global _libc
    nbytes = t.numel() * t.element_size()
    if nbytes < min_bytes or not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + nbytes) & ~(_HUGE - 1)
    if end > start:
        _libc.madvise(start, end - start, _MADV_HUGEPAGE)  # failure is harmless: ignored


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
    """Integer crop box (x, y, w, h) in the stored JPEG of a box given in original-image pixels.

    bbx: (x1, y1, x2, y2) in the original image; size / orig_size: (w, h) of the stored and the
    original image (they differ when sharding re-encoded the image smaller). Coordinates are
    rounded as PIL's Image.crop rounds them (Python round: half to even). The box is not clipped:
    like PIL's crop, the parts outside the image are black (see `clip_window`); it is at least 1×1.
    """
    sx, sy = size[0] / orig_size[0], size[1] / orig_size[1]
    x1, y1 = int(round(bbx[0] * sx)), int(round(bbx[1] * sy))
    x2, y2 = int(round(bbx[2] * sx)), int(round(bbx[3] * sy))
    return x1, y1, max(x2 - x1, 1), max(y2 - y1, 1)


def clip_window(window, size):
    """The part of crop box `window` (x, y, w, h) inside an image of `size` (w, h), as the window
    to decode (x, y, w, h), at least 1×1 and inside the image, and the box's corner relative to it
    (dx, dy): the box is that window padded with black to (w, h) from (dx, dy), PIL's crop."""
    x, y, w, h = window
    x1, y1 = min(max(x, 0), size[0] - 1), min(max(y, 0), size[1] - 1)
    x2, y2 = max(min(x + w, size[0]), x1 + 1), max(min(y + h, size[1]), y1 + 1)
    return (x1, y1, x2 - x1, y2 - y1), (x - x1, y - y1)


def thumbnail_shape(width, height, target):
    """(w, h) that PIL's `Image.thumbnail((target, target))` gives a width×height image, the
    original evaluation resize: the longer side floor(target), the other the whole number (floor
    or ceil, floor on a tie) whose aspect ratio is nearest, at least 1; never enlarged (the image
    is kept when both sides fit). `target` may be fractional (query crops)."""
    t = math.floor(target)
    if t >= width and t >= height:
        return width, height
    aspect = width / height

    def nearest(number, error):
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    if 1 >= aspect:  # PIL: x / y >= aspect with x = y = t
        return nearest(t * aspect, lambda n: abs(aspect - n / t)), t
    return t, nearest(t / aspect, lambda n: 0 if n == 0 else abs(aspect - t / n))


def query_shape(window, size, target):
    """(w, h) of a query crop box `window` (x, y, w, h) of an image of `size` (w, h) for longer
    side `target`: the original's thumbnail at target × (crop's longer side / image's longer side),
    so that the crop is scaled as the whole image would be."""
    _, _, w, h = window
    return thumbnail_shape(w, h, target * (max(w, h) / max(size)))
