"""Validate one input image and turn it into the bytes a shard stores.

Every accepted image is fully decoded once (no `draft`): decoding is the only way to know
that a JPEG is not truncated or corrupt. A baseline RGB JPEG that fits `max_side` keeps its
original bytes; everything else (CMYK, grayscale, palette, alpha, 16-bit, PNG/WebP/...,
progressive, too large, and with `exif_transpose` EXIF-rotated) is re-encoded as an RGB
baseline JPEG at quality 95.

EXIF orientation: by default the stored pixels are kept as they are, unrotated, as the original
InsCLR reads images (PIL open + convert) and as the revisitop / INSTRE query boxes are drawn;
`exif_transpose=True` applies the orientation to the pixels (the loaders never apply it).

Problems become a `Rejected` with a short reason, never a crash.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

JPEG_QUALITY = 95
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

# The bomb check below is ours (a clear rejection, before any decode), so Pillow's is disabled,
# and truncated files must raise rather than be silently padded with gray.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class Rejected(Exception):
    """An input that cannot become a sample; `str(e)` is the reason recorded in the manifest."""


def convert_image(data, max_side=None, max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False):
    """Validate encoded image `data` (bytes) and return (jpeg_bytes, size, orig_size).

    size / orig_size are (width, height) of the stored JPEG and of the original (EXIF-oriented
    with `exif_transpose`); an input kept as it is returns `data` itself (the same object). Raises
    Rejected(reason) for empty, non-image, corrupt, truncated or too large inputs.
    """
    if not data:
        raise Rejected("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd metadata; the decode decides
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise Rejected(f"invalid size {width}x{height}")
            if max_pixels and width * height > max_pixels:
                raise Rejected(f"decompression bomb: {width}x{height} = {width * height} pixels "
                               f"> limit {max_pixels}")
            fmt = image.format
            progressive = bool(image.info.get("progressive") or image.info.get("progression"))
            image.load()
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise Rejected(_decode_reason(data, e)) from None
    if fmt == "JPEG" and not _has_eoi(data):
        raise Rejected("truncated JPEG (no end-of-image marker)")
    orientation = _orientation(image) if exif_transpose else None
    keep = (fmt == "JPEG" and image.mode == "RGB" and not progressive and orientation in (None, 1)
            and (max_side is None or max(width, height) <= max_side))
    if keep:
        return data, (width, height), (width, height)
    rgb = to_rgb(image)
    if orientation not in (None, 1):
        rgb = _orient(rgb, orientation)
    orig_size = rgb.size
    if max_side is not None and max(orig_size) > max_side:
        rgb = rgb.resize(fit_longest(orig_size, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), rgb.size, orig_size


def fit_longest(size, side):
    """(w, h) scaled so that the longer side is `side`, aspect kept (rounded, at least 1)."""
    w, h = size
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def to_rgb(image):
    """An 8-bit RGB version of any Pillow image; alpha is composited over white, 16-bit scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PNG/TIFF): map the full 0..65535 range onto 0..255.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _orientation(image):
    if image.format == "JPEG" and "exif" not in image.info:
        return None  # no APP1 Exif segment: skip getexif(), which costs as much as a small decode
    try:
        value = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # malformed EXIF must not reject an otherwise good image
        return None
    return value if value in range(1, 9) else None


_TRANSPOSE = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}


def _orient(image, orientation):
    """Apply EXIF `orientation` (2..8) to the pixels (the re-encoded JPEG carries no EXIF)."""
    for op in _TRANSPOSE.get(orientation, []):
        image = image.transpose(op)
    return image


def _has_eoi(data):
    # 0xFFD9 cannot occur inside entropy-coded data (0xFF is stuffed), so its absence means
    # the stream was cut; trailing bytes after it (some cameras append data) are allowed.
    return data.rfind(b"\xff\xd9") >= 2


def _decode_reason(data, error):
    text = str(error)
    if "truncated" in text or isinstance(error, EOFError):
        return "truncated image" + (" (JPEG)" if data[:2] == b"\xff\xd8" else "")
    return f"corrupt image: {text}" if text else f"corrupt image ({type(error).__name__})"


def read_input(path):
    """The bytes of the file at `path`; a missing or unreadable file is Rejected."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("missing file") from None
    except IsADirectoryError:
        raise Rejected("not a file (directory)") from None
    except OSError as e:
        raise Rejected(f"unreadable file: {e.strerror or e}") from None


def read_and_convert(path, max_side=None, max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False):
    """convert_image on the file at `path`; a missing or unreadable file is Rejected too.

    Returns (jpeg_bytes, size, orig_size, input_bytes).
    """
    data = read_input(path)
    jpeg, size, orig_size = convert_image(data, max_side=max_side, max_pixels=max_pixels,
                                          exif_transpose=exif_transpose)
    return jpeg, size, orig_size, len(data)
