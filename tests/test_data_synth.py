"""The loaders on the shared tiny synthetic shards (conftest's shards_dir, made by the real
`insclr.shard`): several shards per set, real ground-truth boxes. Pixel-level checks against
Pillow live in test_data_loaders.py (on shards whose sizes it controls)."""

import tarfile

import numpy as np
import torch

from insclr.data import NeighborBatchSampler, ShardReader, StreamLoader, TrainLoader
from insclr.data.transforms import query_shape, query_window
from insclr.shard.manifest import Manifest


def test_reader_bytes_equal_the_tar_members(shards_dir):
    m = Manifest.load(shards_dir / "gldv2")
    with ShardReader(m, threads=2) as reader:
        for shard in m.shards():
            with tarfile.open(shard.tar) as tar:
                for j, member in enumerate(n for n in tar.getmembers() if n.name.endswith(".jpg")):
                    i = shard.first + j
                    assert member.name == f"{i:09d}.jpg"
                    assert bytes(reader.read([i])[0]) == tar.extractfile(member).read()


def test_stream_every_sample_once_over_shards(shards_dir):
    m = Manifest.load(shards_dir / "gldv2")
    n = m.num_samples()
    assert len(m.shards()) > 1
    got = [StreamLoader(m, mode="square", size=32, batch_size=8, rank=r, world_size=2) for r in range(2)]
    idx = np.concatenate([i.numpy() for loader in got for _, i in loader])
    assert np.array_equal(idx, np.arange(n))


def test_query_crops_have_the_scaled_box_size(shards_dir):
    m = Manifest.load(shards_dir / "roxford5k")
    gnd = m.ground_truth()["gnd"]
    sizes, orig = m.sizes("query"), m.orig_sizes("query")
    for images, idx in StreamLoader(m, split="query", mode="query", size=64):
        q = idx.item()
        size = (int(sizes[q][0]), int(sizes[q][1]))
        w, h = query_shape(query_window(gnd[q]["bbx"], size, orig[q]), size, 64)
        assert images.shape == (1, 3, h, w)


def test_train_loader_on_gldv2(shards_dir):
    m = Manifest.load(shards_dir / "gldv2")
    n = m.num_samples()
    nb = np.stack([(np.arange(n) + j) % n for j in range(1, 4)], axis=1)
    sampler = NeighborBatchSampler(nb, batch=4, k=3, seed=0)
    loader = TrainLoader(m, sampler, size=32, crop_scale=(0.75, 1.33), noaug_size=40)
    for step, b in zip(range(2), loader):
        idx, lab = sampler.global_batch(step)
        assert torch.equal(b.indices, torch.from_numpy(idx)) and torch.equal(b.labels, torch.from_numpy(lab))
        assert b.aug.shape == (16, 3, 32, 32) and b.noaug.shape == (16, 3, 40, 40)
    loader.close()
