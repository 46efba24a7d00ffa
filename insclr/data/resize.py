"""Crop + resize + flip of decoded uint8 images on the CPU, with torch's uint8 kernels, and the
evaluation resize with Pillow's Lanczos.

On the CPU the pipelines stop after the (window) decode and the loaders resize here: torch's
antialiased bilinear uint8 kernel (the filter DALI's linear + antialias and Pillow's BILINEAR
use) is about ten times faster per core than DALI's CPU resize on this machine (measured: full
640×480 → 512² about 280 vs 30 images/s per thread), and the resize was most of the time. On a
GPU DALI resizes in the pipeline; both paths are tested against Pillow.

Evaluation images are scaled as the original evaluator scales them, by Pillow's thumbnail
(Lanczos, antialiased): on the CPU with Pillow itself (`lanczos_resize`, the same pixels), on a
GPU with DALI's Lanczos3 filter (insclr/data/pipelines.py; docs/evaluation.md gives the difference).

`pillow_views` makes a training row's views with Pillow alone, as the original's torchvision
transforms do (`data.decoder=pillow`: a reference path for side-by-side comparisons, not for speed).
"""

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from insclr.data.transforms import advise_hugepages


def hwc_tensors(tensor_list):
    """A DALI TensorListCPU of HWC uint8 images -> list of torch [H,W,3] tensors sharing its memory.

    The views are valid until the pipeline is run again; use them before the next run().
    """
    return [torch.from_numpy(np.asarray(tensor_list[i])) for i in range(len(tensor_list))]


def resize_image(image_hwc, out_h, out_w, window=None, flip=False):
    """uint8 [H,W,3] -> uint8 [1,3,out_h,out_w] (channels_last): crop `window` (x, y, w, h) if
    given, resize (bilinear, antialiased when shrinking), mirror horizontally if `flip`."""
    if window is not None:
        x, y, w, h = (int(v) for v in window)
        image_hwc = image_hwc[y:y + h, x:x + w]
    # A contiguous NHWC block viewed as NCHW is what torch's fast uint8 kernel takes.
    img = image_hwc.contiguous()[None].permute(0, 3, 1, 2)
    if img.shape[2:] != (out_h, out_w):
        img = F.interpolate(img, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return img.flip(-1) if flip else img


def resize_batch(images_hwc, out_h, out_w, windows=None, flips=None):
    """list of uint8 [H,W,3] -> uint8 [B,3,out_h,out_w] (channels_last memory)."""
    out = torch.empty((len(images_hwc), out_h, out_w, 3), dtype=torch.uint8)
    advise_hugepages(out)  # a fresh batch each step (64 × 512² × 3: 50 MB of first-touch faults)
    for i, img in enumerate(images_hwc):
        window = None if windows is None else windows[i]
        flip = False if flips is None else bool(flips[i])
        out[i] = resize_image(img, out_h, out_w, window, flip)[0].permute(1, 2, 0)
    return out.permute(0, 3, 1, 2)


def lanczos_resize(image_hwc, out_h, out_w):
    """uint8 [H,W,3] -> uint8 [1,3,out_h,out_w] (channels_last), as PIL's `Image.thumbnail` resizes
    (the original evaluation's): Lanczos with antialiasing, after an integer box reduction when
    shrinking 4× or more (thumbnail's reducing_gap 2). Same size: the image unchanged."""
    array = image_hwc.numpy()
    if array.shape[:2] != (out_h, out_w):
        image = Image.fromarray(np.ascontiguousarray(array), "RGB")
        array = np.asarray(image.resize((out_w, out_h), Image.Resampling.LANCZOS, reducing_gap=2.0))
    return torch.from_numpy(np.array(array))[None].permute(0, 3, 1, 2)


def lanczos_batch(images_hwc, out_h, out_w):
    """list of uint8 [H,W,3] -> uint8 [B,3,out_h,out_w] (channels_last memory), `lanczos_resize`."""
    out = torch.empty((len(images_hwc), out_h, out_w, 3), dtype=torch.uint8)
    for i, img in enumerate(images_hwc):
        out[i] = lanczos_resize(img, out_h, out_w)[0].permute(1, 2, 0)
    return out.permute(0, 3, 1, 2)


def pillow_views(jpeg, size, window, flip, noaug_size=None):
    """The original's pixels of one training row, for `data.decoder=pillow`: Pillow decodes the
    whole JPEG, crops `window` (x, y, w, h) and resizes it to size×size with BILINEAR (what
    torchvision's RandomResizedCrop does to a PIL image), mirrors it if `flip`; the no-aug view is
    the whole image resized to noaug_size² (torchvision's Resize((n, n))). Returns uint8 HWC
    arrays (aug, noaug or None); Pillow's errors on damaged data propagate."""
    with Image.open(io.BytesIO(memoryview(jpeg))) as f:
        image = f.convert("RGB")
    x, y, w, h = (int(v) for v in window)
    aug = image.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        aug = aug.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    noaug = image.resize((noaug_size, noaug_size), Image.Resampling.BILINEAR) if noaug_size else None
    return np.asarray(aug), (np.asarray(noaug) if noaug is not None else None)
