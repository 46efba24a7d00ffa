"""`shard_dataset`: a dataset in its original layout -> a shard folder (docs/formats.md).

Reads the dataset's list files first (any error there stops the job before anything is
written), shards each split with `SplitBuilder` (resuming complete shards), then assembles
`ground_truth.json` and, last, `manifest.json` from the shard records.
"""

from pathlib import Path

from insclr import __version__
from insclr.shard.build import Options, SplitBuilder, remove_stray_files, write_json_compact
from insclr.shard.images import DEFAULT_MAX_PIXELS
from insclr.shard.manifest import FORMAT, GROUND_TRUTH, MANIFEST, Manifest, identity_of
from insclr.shard.sources import read_source


# Sets whose ground truth draws query boxes in the stored pixels: rotating them would move the boxes.
BOXED = ("roxford5k", "rparis6k", "instre")


def shard_dataset(dataset, src, out, *, max_side=None, shard_size_mb=1024, per_shard=None, workers=1,
                  min_images=15, max_pixels=DEFAULT_MAX_PIXELS, exif_transpose=False, command=None):
    """Shard `dataset` read from `src` into folder `out`; returns the loaded Manifest.

    exif_transpose: store the pixels rotated by their EXIF orientation (default: as stored, the
    original's reading); refused for the sets with query boxes (BOXED).

    A re-run on the same `out` keeps the complete shards and finishes the rest (byte-identical
    to an uninterrupted run); shards made from other inputs or options are an error.
    """
    if per_shard is not None and per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    if shard_size_mb is not None and shard_size_mb <= 0:
        raise ValueError(f"--shard-size must be > 0 MB, got {shard_size_mb}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"--max-side must be >= 1, got {max_side}")
    if exif_transpose and dataset in BOXED:
        raise ValueError(f"--exif-transpose: {dataset} has query boxes drawn on the stored pixels; rotated "
                         f"images would be cropped in the wrong place (shard it without --exif-transpose)")
    source = read_source(dataset, src, min_images=min_images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stray_files(out)
    options = Options(max_side=max_side, shard_size_mb=shard_size_mb, per_shard=per_shard,
                      max_pixels=max_pixels, workers=max(1, int(workers)), exif_transpose=bool(exif_transpose))
    splits, index_maps, rejected = {}, {}, []
    for split, items in source.splits.items():
        records, unplaced = SplitBuilder(out, source.dataset, split, items, options, src_root=src).run()
        splits[split] = split_entry(records)
        index_maps[split] = index_map(len(items), records)
        for r in [r for rec in records for r in rec["rejected"]] + unplaced:
            rejected.append({"split": split, "source": r["source"], "id": r["id"], "reason": r["reason"]})
    if source.ground_truth is not None:
        write_json_compact(out / GROUND_TRUTH, source.ground_truth(index_maps))
    if command is None:
        command = _command(dataset, src, out, max_side, shard_size_mb, per_shard, workers, min_images, max_pixels,
                           exif_transpose)
    manifest = {
        "format": FORMAT,
        "dataset": source.dataset,
        "created_by": {"command": list(command), "version": __version__},
        "options": {"max_side": max_side, "shard_size_mb": shard_size_mb, "per_shard": per_shard,
                    "max_pixels": max_pixels, "min_images": min_images if dataset == "gldv2" else None,
                    "exif_transpose": bool(exif_transpose)},
        "num_samples": splits["part"]["num_samples"],
        "splits": splits,
        "rejected": rejected,
        "notes": source.notes,
    }
    manifest["identity"] = identity_of(manifest)
    write_json_compact(out / MANIFEST, manifest)
    return Manifest.load(out)


def split_entry(records):
    """The manifest's entry of one split, concatenated from its shard records (in order)."""
    entry = {"num_samples": sum(r["count"] for r in records), "shards": []}
    for r in records:
        entry["shards"].append({k: r[k] for k in ("tar", "idx", "count", "first", "sha256", "idx_sha256",
                                                  "tar_bytes")})
    for column in ("ids", "labels", "sizes", "orig_sizes"):
        entry[column] = [v for r in records for v in r[column]]
    return entry


def index_map(num_inputs, records):
    """list[num_inputs]: the dense sample index of each input position, None where rejected."""
    mapping = [None] * num_inputs
    for r in records:
        rejected = {x["input"] for x in r["rejected"]}
        index = r["first"]
        for pos in range(r["input_start"], r["input_end"]):
            if pos not in rejected:
                mapping[pos] = index
                index += 1
        if index != r["first"] + r["count"]:
            raise ValueError(f"shard record {r['tar']}: input slice gives {index - r['first']} samples, "
                             f"record says {r['count']}")
    return mapping


def _command(dataset, src, out, max_side, shard_size_mb, per_shard, workers, min_images, max_pixels,
             exif_transpose=False):
    cmd = ["python", "-m", "insclr.shard", dataset, "--src", str(src), "--out", str(out)]
    if max_side is not None:
        cmd += ["--max-side", str(max_side)]
    cmd += ["--per-shard", str(per_shard)] if per_shard else ["--shard-size", str(shard_size_mb)]
    cmd += ["--workers", str(workers)]
    if dataset == "gldv2":
        cmd += ["--min-images", str(min_images)]
    if max_pixels != DEFAULT_MAX_PIXELS:
        cmd += ["--max-pixels", str(max_pixels)]
    if exif_transpose:
        cmd += ["--exif-transpose"]
    return cmd
