"""RandomResizedCrop windows (torchvision semantics, scales above 1 included) and normalize."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from insclr.data import normalize, rrc_windows
from insclr.data.transforms import clip_window, query_shape, query_window, thumbnail_shape


def test_windows_inside_image_with_area_and_aspect_in_range():
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 400, size=(500, 2))
    win = rrc_windows(rng, sizes, scale=(0.2, 0.9), ratio=(3 / 4, 4 / 3))
    x, y, w, h = win.T
    assert np.all((x >= 0) & (y >= 0) & (x + w <= sizes[:, 0]) & (y + h <= sizes[:, 1]) & (w > 0) & (h > 0))
    frac = w * h / (sizes[:, 0] * sizes[:, 1])
    assert frac.min() > 0.2 * 0.9 and frac.max() < 0.9 * 1.1  # rounding of w, h only
    aspect = w / h
    assert aspect.min() > 0.75 * 0.9 and aspect.max() < 4 / 3 * 1.1


def test_fallback_is_torchvisions_centre_crop():
    # No window of area > 1.2 × the image fits, so every try fails: torchvision's fallback.
    for wh in [(400, 50), (50, 400), (120, 100)]:
        img = torch.zeros(3, wh[1], wh[0])
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale=(1.2, 1.33), ratio=(3 / 4, 4 / 3))
        win = rrc_windows(np.random.default_rng(1), [wh], scale=(1.2, 1.33))
        assert win.tolist() == [[j, i, w, h]]


def test_scale_above_one_matches_torchvision_statistics():
    # The GLDv2 recipe's scale (0.75, 1.33): some tries fit, some images fall back to the centre.
    sizes = np.array([[640, 480]] * 2000)
    win = rrc_windows(np.random.default_rng(2), sizes, scale=(0.75, 1.33))
    torch.manual_seed(0)
    img = torch.zeros(3, 480, 640)
    ref = np.array([T.RandomResizedCrop.get_params(img, (0.75, 1.33), (3 / 4, 4 / 3)) for _ in range(2000)])
    ours_area = (win[:, 2] * win[:, 3]).mean() / (640 * 480)
    ref_area = (ref[:, 2] * ref[:, 3]).mean() / (640 * 480)
    assert abs(ours_area - ref_area) < 0.01
    full_ours = np.mean((win[:, 2] == 640) & (win[:, 3] == 480))
    full_ref = np.mean((ref[:, 3] == 640) & (ref[:, 2] == 480))
    assert abs(full_ours - full_ref) < 0.03
    # Corners are uniform over the valid positions: mean of x / (W - w) is about 1/2.
    free = 640 - win[:, 2]
    assert abs(np.mean(win[free > 0, 0] / free[free > 0]) - 0.5) < 0.03


def test_windows_depend_only_on_the_generator():
    sizes = [[100, 80], [30, 200]]
    a = rrc_windows(np.random.default_rng([0, 1, 5]), sizes, (0.4, 1.0))
    b = rrc_windows(np.random.default_rng([0, 1, 5]), sizes, (0.4, 1.0))
    assert np.array_equal(a, b)


def test_normalize_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = normalize(x)
    ref = TF.normalize(x.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5)  # other float32 op orders: a few u of values below 2.7
    assert normalize(x, channels_last=False).is_contiguous()
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float())


def test_query_window_rounds_as_pil_and_keeps_the_outside():
    # Box in original coordinates of a 200×100 image stored at 100×50: halved, rounded like PIL.
    # 30.5 rounds to 30 (half to even, as PIL's crop).
    assert query_window([20.4, 10, 121, 61], size=(100, 50), orig_size=(200, 100)) == (10, 5, 50, 25)
    # reaching outside: kept (PIL's crop fills the outside with black); the decoded part is clipped
    box = query_window([-5, -5, 500, 500], size=(100, 50), orig_size=(100, 50))
    assert box == (-5, -5, 505, 505)
    assert clip_window(box, (100, 50)) == ((0, 0, 100, 50), (-5, -5))
    assert clip_window((120, 10, 5, 5), (100, 50)) == ((99, 10, 1, 5), (21, 0))  # wholly outside: black


def _pil_thumbnail(w, h, target):
    image = Image.new("RGB", (w, h))
    image.thumbnail((target, target), Image.Resampling.LANCZOS)
    return image.size


@pytest.mark.parametrize("w,h,target", [(640, 480, 1024), (1000, 333, 500), (333, 1000, 500), (480, 640, 256),
                                        (300, 300, 256), (7, 500, 256), (500, 7, 256), (1001, 999, 1000),
                                        (640, 427, 255.99), (257, 256, 256), (500, 301, 100.5)])
def test_thumbnail_shape_is_pils(w, h, target):
    assert thumbnail_shape(w, h, target) == _pil_thumbnail(w, h, target)


def test_thumbnail_shape_matches_pil_on_random_sizes():
    rng = np.random.default_rng(0)
    for w, h, t in zip(rng.integers(1, 900, 300), rng.integers(1, 900, 300), rng.uniform(1, 600, 300)):
        assert thumbnail_shape(int(w), int(h), float(t)) == _pil_thumbnail(int(w), int(h), float(t))


def test_query_shape_scales_the_crop_like_the_whole_image():
    # the original: thumbnail at size × (crop's longer side / image's longer side), rounded down
    assert query_shape((0, 0, 100, 60), (400, 300), 256) == (64, 38)  # 256 * 100 / 400 = 64
    assert query_shape((0, 0, 101, 60), (400, 300), 256) == (64, 38)  # 64.64 -> 64, not 65
    assert query_shape((0, 0, 100, 60), (200, 150), 256) == (100, 60)  # never enlarged
