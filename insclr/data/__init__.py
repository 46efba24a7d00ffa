"""The DALI data path: streaming and random-access loaders, batch samplers, normalisation.

See docs/data.md. Loaders yield uint8 images on the target device; call `normalize` inside
the step. The loaders import DALI when first used (PEP 562), so the samplers, the reader and
the transforms work where DALI is not installed (a benchmark of the training step, say).
"""

import importlib

_EXPORTS = {
    "ShardReader": "reader",
    "NeighborBatchSampler": "sampler", "SequentialBatches": "sampler",
    "StreamLoader": "stream",
    "TrainBatch": "train_loader", "TrainLoader": "train_loader",
    "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms", "normalize": "transforms",
    "rrc_windows": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'insclr.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"insclr.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
