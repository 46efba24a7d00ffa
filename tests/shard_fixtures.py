"""Tiny datasets in the original on-disk layouts, with every kind of bad input, for the shard tests.

Kept separate from insclr.synth on purpose: these files are small, hand-made and exercise the
corner cases (bad images, missing files, rejected queries) that a realistic generator avoids.
"""

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def noise(w, h, seed, mode="RGB"):
    """A deterministic image of random blocks (compresses little, decodes like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST)
    return image if mode == "RGB" else image.convert(mode)


def jpeg_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def bad_inputs():
    """{name: (bytes, expected)}: expected is 'keep', 'convert' or a substring of the rejection reason."""
    out = {}
    out["good.jpg"] = (jpeg_bytes(noise(64, 48, 1)), "keep")
    out["cmyk.jpg"] = (jpeg_bytes(noise(40, 30, 2, "CMYK")), "convert")
    out["gray.jpg"] = (jpeg_bytes(noise(40, 30, 3, "L")), "convert")
    out["progressive.jpg"] = (jpeg_bytes(noise(40, 30, 4), progressive=True), "convert")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    # kept: the stored pixels, unrotated, by default (re-encoded rotated with exif_transpose)
    out["rotated.jpg"] = (jpeg_bytes(noise(40, 30, 5), exif=exif.tobytes()), "keep")
    for name, image, fmt in (("palette.png", noise(40, 30, 6, "P"), "PNG"),
                             ("rgba.png", noise(40, 30, 7, "RGBA"), "PNG"),
                             ("webp.webp", noise(40, 30, 8), "WEBP")):
        buf = io.BytesIO()
        image.save(buf, fmt)
        out[name] = (buf.getvalue(), "convert")
    buf = io.BytesIO()
    Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)).save(buf, "PNG")
    out["gray16.png"] = (buf.getvalue(), "convert")
    good = out["good.jpg"][0]
    out["zero.jpg"] = (b"", "empty file")
    out["truncated.jpg"] = (good[: len(good) // 2], "truncated")
    dht, sos = good.index(b"\xff\xc4"), good.index(b"\xff\xda")
    # Zeroed Huffman tables: a JPEG header Pillow accepts, whose entropy data cannot decode.
    out["corrupt.jpg"] = (good[:dht + 5] + bytes(sos - dht - 5) + good[sos:], "corrupt image")
    out["text.jpg"] = (b"this is not an image\n" * 10, "not an image")
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, "PNG")  # tiny file, 90000 pixels: over the test's --max-pixels
    out["bomb.png"] = (buf.getvalue(), "decompression bomb")
    return out


def make_folder(root, inputs=None):
    """A `folder` dataset holding `inputs` (default bad_inputs()) plus a list file naming a missing one."""
    root = Path(root)
    inputs = bad_inputs() if inputs is None else inputs
    for name, (data, _) in inputs.items():
        write(root / "images" / name, data)
    names = sorted(inputs) + ["missing.jpg"]
    (root / "list.txt").write_text("# inputs\n" + "\n".join(f"images/{n}" for n in names) + "\n")
    return root


def make_revisitop(root, name="roxford5k", n_db=10, n_query=3, bad_db=(3,), bad_query=(1,)):
    """A revisitop-layout set: gnd_<name>.pkl + jpg/; images in `bad_db` / `bad_query` are truncated."""
    root = Path(root) / name
    imlist = [f"all_souls_{i:06d}" for i in range(n_db)]
    qimlist = [f"query_{i:06d}" for i in range(n_query)]
    for i, n in enumerate(imlist):
        data = jpeg_bytes(noise(64 + 8 * i, 48, 100 + i))
        write(root / "jpg" / f"{n}.jpg", data[:100] if i in bad_db else data)
    for i, n in enumerate(qimlist):
        data = jpeg_bytes(noise(60, 80, 200 + i))
        write(root / "jpg" / f"{n}.jpg", data[:100] if i in bad_query else data)
    gnd = [{"bbx": [1.5, 2.0, 30.0, 40.0 + q], "easy": [0, 3, q + 4], "hard": [5, 6], "junk": [n_db - 1]}
           for q in range(n_query)]
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


def make_gldv2(root, landmarks=((7, 4), (3, 2), (12, 5)), missing=1):
    """A GLDv2 train layout: train_clean.csv + train/a/b/c/<id>.jpg; the first `missing` ids have no file.

    `landmarks` is ((landmark_id, number of images), ...).
    """
    root = Path(root) / "gldv2"
    rows, k = [], 0
    for landmark, count in landmarks:
        ids = [f"{0xabc000 + k + j:016x}" for j in range(count)]
        for j, image_id in enumerate(ids):
            if k + j >= missing:
                write(root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg",
                      jpeg_bytes(noise(50, 40, 300 + k + j)))
        rows.append(f"{landmark},{' '.join(ids)}")
        k += count
    write(root / "train_clean.csv", ("landmark_id,images\n" + "\n".join(rows) + "\n").encode())
    return root


def make_instre(root):
    """An INSTRE layout: gnd_instre.mat (1-based ok, [x1 y1 x2 y2] bbx) + class folders."""
    import scipy.io

    root = Path(root) / "instre"
    imlist = [f"INSTRE-S1/01a_book/{i:03d}.jpg" for i in range(3)] + [f"INSTRE-S2/01_cup/{i:03d}.jpg" for i in range(3)]
    qimlist = ["INSTRE-S1/01a_book/100.jpg", "INSTRE-S2/01_cup/100.jpg"]
    for i, n in enumerate(imlist + qimlist):
        write(root / n, jpeg_bytes(noise(48, 40, 400 + i)))
    gnd = np.zeros((1, 2), dtype=[("ok", object), ("bbx", object)])
    gnd[0, 0] = (np.array([[1, 2, 3]], dtype=np.int32), np.array([[2.0, 3.0, 20.0, 30.0]]))
    gnd[0, 1] = (np.array([[4, 5, 6]], dtype=np.int32), np.array([[0.0, 1.0, 40.0, 39.0]]))
    cells = lambda names: np.array([names], dtype=object)  # noqa: E731 - a 1xN cell array
    scipy.io.savemat(root / "gnd_instre.mat", {"imlist": cells(imlist), "qimlist": cells(qimlist), "gnd": gnd})
    return root
