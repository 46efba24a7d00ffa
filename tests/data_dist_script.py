"""Run by tests/test_data_dist.py under `torchrun --nproc_per_node 2`: both loaders on two ranks.

argv: SHARD_DIR OUT_JSON. Rank 0 writes what every rank saw.
"""

import json
import sys

import numpy as np
import torch.distributed as dist

from insclr import dist as idist
from insclr.data import NeighborBatchSampler, StreamLoader, TrainLoader


def main(argv=None):
    root, out = (sys.argv[1:] if argv is None else argv)[:2]
    idist.init("cpu")
    rank, world = idist.rank(), idist.world_size()
    streamed = [i.tolist() for _, idx in StreamLoader(root, mode="square", size=16, batch_size=4, rank=rank,
                                                      world_size=world) for i in idx]
    nb = np.stack([(np.arange(23) + j) % 23 for j in range(1, 4)], axis=1)
    sampler = NeighborBatchSampler(nb, batch=4, k=3, seed=2, rank=rank, world_size=world)
    loader = TrainLoader(root, sampler, size=16, crop_scale=(0.75, 1.33), seed=0, rank=rank)
    rows = []
    for step, b in zip(range(3), loader):
        rows.append({"step": step, "indices": b.indices.tolist(), "labels": b.labels.tolist(),
                     "global": [a.tolist() for a in sampler.global_batch(step)]})
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "streamed": streamed, "rows": rows})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    idist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
