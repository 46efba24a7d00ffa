"""Shard folders written straight from JPEG bytes held in memory: the one writer the tests and the
benchmarks share (the real sharder, `insclr.shard`, reads datasets from their original layouts).

    entry = write_split(root, "part", samples, per_shard=7)   # tars + DALI indexes of one split
    write_manifest(root, {"part": entry}, dataset="bench", command=["insclr.bench.loader"])

A sample is (jpeg bytes, meta) with meta {"index", "id", "label", "size", "orig_size"}, as the
sharder stores it (docs/formats.md); the index runs 0..n-1 in the split's order.
"""

import json
from pathlib import Path

from insclr.io import write_json
from insclr.shard.writer import ShardWriter, sample_key, sha256_file


def write_split(root, split, samples, per_shard=None):
    """Write `samples` as root/{split}-000000.tar/.idx, ... (per_shard samples each, default all in
    one); returns the manifest's entry for the split."""
    root = Path(root)
    per_shard = per_shard or max(1, len(samples))
    shards, first = [], 0
    for s, start in enumerate(range(0, len(samples), per_shard)):
        stem = root / f"{split}-{s:06d}"
        with ShardWriter(stem) as w:
            for data, meta in samples[start:start + per_shard]:
                w.write(sample_key(meta["index"]), {"jpg": data, "json": json.dumps(meta).encode()})
        tar, idx = stem.with_name(stem.name + ".tar"), stem.with_name(stem.name + ".idx")
        shards.append({"tar": tar.name, "idx": idx.name, "count": w.count, "first": first,
                       "sha256": sha256_file(tar), "idx_sha256": sha256_file(idx)})
        first += w.count
    metas = [meta for _, meta in samples]
    return {"num_samples": len(samples), "shards": shards, "ids": [m["id"] for m in metas],
            "labels": [m["label"] for m in metas], "sizes": [list(m["size"]) for m in metas],
            "orig_sizes": [list(m["orig_size"]) for m in metas]}


def write_manifest(root, splits, dataset, command, options=None):
    """root/manifest.json for the split entries `splits` ({name: write_split(...)}); the sample count
    is the 'part' split's (the training set), as the sharder writes it."""
    part = splits.get("part") or next(iter(splits.values()))
    write_json(Path(root) / "manifest.json", {
        "format": "insclr-shards/1", "dataset": dataset, "created_by": {"command": list(command), "version": "0"},
        "options": options or {}, "num_samples": part["num_samples"], "splits": splits, "rejected": []})
