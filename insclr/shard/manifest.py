"""Reading a shard set: `manifest.json`, its shards and the ground truth beside it.

The format is documented in docs/formats.md. Every consumer (loaders, evaluation,
verification) goes through `Manifest` so that paths and columns are resolved in one place.
"""

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from insclr.io import read_json

MANIFEST = "manifest.json"
GROUND_TRUTH = "ground_truth.json"
FORMAT = "insclr-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    tar: Path         # absolute path of the tar
    idx: Path         # absolute path of its DALI index
    count: int        # samples in this shard
    first: int        # dataset index of its first sample (keys are first .. first + count - 1)
    sha256: str       # of the tar
    idx_sha256: str   # of the index
    tar_bytes: int    # size of the tar (None in manifests written before it was recorded)


class Manifest:
    """A loaded `manifest.json`; `root` is the shard folder."""

    def __init__(self, root, data):
        self.root = Path(root)
        self.data = data

    @classmethod
    def load(cls, root):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"shard folder not found: {root} (make it with `python -m insclr.shard`)")
        data = read_json(root / MANIFEST, what="shard manifest")
        if data.get("format") != FORMAT:
            raise ValueError(f"{root / MANIFEST}: format {data.get('format')!r} is not {FORMAT!r}")
        return cls(root, data)

    @property
    def dataset(self):
        return self.data["dataset"]

    @property
    def splits(self):
        return list(self.data["splits"])

    def split(self, split):
        try:
            return self.data["splits"][split]
        except KeyError:
            raise ValueError(f"{self.root / MANIFEST}: no split {split!r} (has {', '.join(self.splits)})") from None

    def num_samples(self, split="part"):
        return int(self.split(split)["num_samples"])

    def shards(self, split="part"):
        return [ShardInfo(self.root / s["tar"], self.root / s["idx"], int(s["count"]), int(s["first"]),
                          s["sha256"], s["idx_sha256"], s.get("tar_bytes")) for s in self.split(split)["shards"]]

    @cached_property
    def identity(self):
        """sha256 (hex) naming this shard set: its dataset and, per split, every shard's records
        (name, count, first index, sha256 of tar and index). Files made from the folder (features,
        pools, checkpoints) record it, so that inputs from different folders are never mixed.
        Manifests written before it was stored get it computed; a stored one that differs means
        the manifest was edited."""
        computed = identity_of(self.data)
        stored = self.data.get("identity")
        if stored is not None and stored != computed:
            raise ValueError(f"{self.root / MANIFEST}: its 'identity' does not match its shard records "
                             f"(edited by hand?); re-make the folder with `python -m insclr.shard`")
        return computed

    def ids(self, split="part"):
        return list(self.split(split)["ids"])

    def labels(self, split="part"):
        """int64 [n]: the label (landmark / instance) of each sample, -1 where unknown."""
        labels = self.split(split).get("labels")
        if labels is None:
            return np.full(self.num_samples(split), -1, dtype=np.int64)
        return np.array([-1 if v is None else v for v in labels], dtype=np.int64)

    def sizes(self, split="part"):
        """int64 [n, 2]: (width, height) of each stored JPEG."""
        return np.asarray(self.split(split)["sizes"], dtype=np.int64).reshape(-1, 2)

    def orig_sizes(self, split="part"):
        """int64 [n, 2]: (width, height) of each original image (before any --max-side re-encode)."""
        return np.asarray(self.split(split)["orig_sizes"], dtype=np.int64).reshape(-1, 2)

    def ground_truth(self):
        """The evaluation ground truth (dict, see docs/formats.md) or None for training sets."""
        path = self.root / GROUND_TRUTH
        return read_json(path, what="ground truth") if path.exists() else None


def identity_of(data):
    """The identity of a manifest's data (see Manifest.identity)."""
    records = {"format": data.get("format"), "dataset": data.get("dataset"), "splits": {
        name: [[s["tar"], s["idx"], int(s["count"]), int(s["first"]), s["sha256"], s["idx_sha256"]]
               for s in split["shards"]]
        for name, split in sorted(data["splits"].items())}}
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
