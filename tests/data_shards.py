"""Small shard folders for the data-path tests, written with ShardWriter + a manifest per docs/formats.md.

JPEGs are smooth random images (so that resampling is well-defined) of varied sizes.
"""

import hashlib
import io
import json

import numpy as np
from PIL import Image

from insclr.io import write_json
from insclr.shard.writer import ShardWriter, sample_key


def make_jpeg(rng, width, height, quality=90, subsampling=None):
    """subsampling: Pillow's chroma subsampling (0 = 4:4:4); None = Pillow's default (4:2:0)."""
    small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **({} if subsampling is None else {"subsampling": subsampling}))
    return buf.getvalue()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_split(root, split, sizes, per_shard, rng, orig_scale=1.0, subsampling=None):
    """Write `split` of len(sizes) samples; returns (manifest split entry, list of jpeg bytes)."""
    shards, jpegs, first = [], [], 0
    for s, start in enumerate(range(0, len(sizes), per_shard)):
        stem = root / f"{split}-{s:06d}"
        with ShardWriter(stem) as w:
            for i in range(start, min(start + per_shard, len(sizes))):
                width, height = sizes[i]
                data = make_jpeg(rng, width, height, subsampling=subsampling)
                orig = [int(round(width * orig_scale)), int(round(height * orig_scale))]
                meta = {"index": i, "id": f"img{i}", "label": i % 3, "size": [width, height], "orig_size": orig}
                w.write(sample_key(i), {"jpg": data, "json": json.dumps(meta).encode()})
                jpegs.append(data)
        tar, idx = stem.with_name(stem.name + ".tar"), stem.with_name(stem.name + ".idx")
        shards.append({"tar": tar.name, "idx": idx.name, "count": w.count, "first": first,
                       "sha256": _sha(tar), "idx_sha256": _sha(idx)})
        first += w.count
    entry = {"num_samples": len(sizes), "shards": shards, "ids": [f"img{i}" for i in range(len(sizes))],
             "labels": [i % 3 for i in range(len(sizes))], "sizes": [list(s) for s in sizes],
             "orig_sizes": [[int(round(w * orig_scale)), int(round(h * orig_scale))] for w, h in sizes]}
    return entry, jpegs


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
    write_json(root / "manifest.json", {
        "format": "insclr-shards/1", "dataset": "test", "created_by": {"command": ["tests"], "version": "0"},
        "options": {"max_side": None, "shard_size_mb": 1, "per_shard": per_shard}, "num_samples": n,
        "splits": splits, "rejected": []})
    return out
