"""Datasets to shards: `python -m insclr.shard` (see docs/sharding.md and docs/formats.md).

`shard_dataset(dataset, src, out, ...) -> Manifest` writes a shard folder, `verify(out) -> list[str]`
checks one (empty list = OK), `main(argv)` is the command line.
"""

from insclr.shard.cli import main
from insclr.shard.job import shard_dataset
from insclr.shard.verifier import verify

__all__ = ["shard_dataset", "verify", "main"]
