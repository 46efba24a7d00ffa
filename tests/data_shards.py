"""Small shard folders for the data-path tests, written by insclr.synth.shards (tars, indexes, manifest).

JPEGs are smooth random images (so that resampling is well-defined) of varied sizes.
"""

import io

import numpy as np
from PIL import Image

from insclr.io import write_json
from insclr.synth import shards


def make_jpeg(rng, width, height, quality=90, subsampling=None):
    """subsampling: Pillow's chroma subsampling (0 = 4:4:4); None = Pillow's default (4:2:0)."""
    small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **({} if subsampling is None else {"subsampling": subsampling}))
    return buf.getvalue()


def write_split(root, split, sizes, per_shard, rng, orig_scale=1.0, subsampling=None):
    """Write `split` of len(sizes) samples; returns (manifest split entry, list of jpeg bytes)."""
    samples = []
    for i, (width, height) in enumerate(sizes):
        orig = [int(round(width * orig_scale)), int(round(height * orig_scale))]
        samples.append((make_jpeg(rng, width, height, subsampling=subsampling),
                        {"index": i, "id": f"img{i}", "label": i % 3, "size": [width, height], "orig_size": orig}))
    return shards.write_split(root, split, samples, per_shard), [data for data, _ in samples]


def make_shards(root, n=23, per_shard=7, queries=3, seed=0, subsampling=None):
    """A shard folder with a 'part' split of n images and (queries > 0) a 'query' split whose
    stored JPEGs are half the original size, with ground-truth boxes in original coordinates (the
    third reaches outside the image on the left and the bottom). Returns {"part": [jpeg bytes], "query": [...], "boxes": [...]}."""
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(40, 120)), int(rng.integers(40, 120))) for _ in range(n)]
    splits, out = {}, {}
    splits["part"], out["part"] = write_split(root, "part", sizes, per_shard, rng, subsampling=subsampling)
    if queries:
        qsizes = [(int(rng.integers(60, 120)), int(rng.integers(60, 120))) for _ in range(queries)]
        splits["query"], out["query"] = write_split(root, "query", qsizes, per_shard, rng, orig_scale=2.0,
                                                      subsampling=subsampling)
        boxes = [[0.2 * w * 2, 0.1 * h * 2, 0.9 * w * 2, 0.7 * h * 2] for w, h in qsizes]
        if queries > 2:
            w, h = qsizes[2]
            boxes[2] = [-0.15 * w * 2, 0.3 * h * 2, 0.8 * w * 2, 1.2 * h * 2]
        write_json(root / "ground_truth.json", {"type": "revisitop", "gnd": [
            {"bbx": b, "easy": [0], "hard": [], "junk": []} for b in boxes]})
        out["boxes"] = boxes
    shards.write_manifest(root, splits, dataset="test", command=["tests"],
                          options={"max_side": None, "shard_size_mb": 1, "per_shard": per_shard})
    return out
