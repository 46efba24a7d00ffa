"""The DALI data path: streaming and random-access loaders, batch samplers, normalisation.

See docs/data.md. Loaders yield uint8 images on the target device; call `normalize` inside
the step.
"""

from insclr.data.reader import ShardReader
from insclr.data.sampler import NeighborBatchSampler, SequentialBatches
from insclr.data.stream import StreamLoader
from insclr.data.train_loader import TrainBatch, TrainLoader
from insclr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, rrc_windows

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NeighborBatchSampler", "SequentialBatches", "ShardReader",
           "StreamLoader", "TrainBatch", "TrainLoader", "normalize", "rrc_windows"]
