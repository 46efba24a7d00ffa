"""The original project's training data path, as the loader benchmark's baseline.

A torch.utils.data.DataLoader whose worker processes read each row's JPEG file with Pillow and
apply the two views with torchvision transforms: RandomResizedCrop + RandomHorizontalFlip +
ToTensor + Normalize (augmented), and Resize((512, 512)) + ToTensor + Normalize (no-aug). Tuned
as one would tune it: persistent workers (as many as our loader's CPU threads), a batch sampler
so that each worker builds whole batches, prefetch factor 2 and pinned memory when there is a GPU.
"""

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from insclr.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class TwoViewDataset(Dataset):
    """Item `(index, label)` -> (index, label, aug float [3,S,S], noaug float [3,N,N] or empty)."""

    def __init__(self, paths, size, crop_scale, crop_ratio=(3 / 4, 4 / 3), noaug_size=None):
        self.paths = list(paths)
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.aug = T.Compose([T.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=tuple(crop_ratio)),
                              T.RandomHorizontalFlip(), T.ToTensor(), norm])
        self.noaug = T.Compose([T.Resize((noaug_size, noaug_size)), T.ToTensor(), norm]) if noaug_size else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, label = item
        with Image.open(self.paths[index]) as f:
            img = f.convert("RGB")
        noaug = self.noaug(img) if self.noaug is not None else torch.empty(0)
        return index, label, self.aug(img), noaug


class RowBatches:
    """Batch sampler over a fixed list of steps: each step's (indices, labels) rows."""

    def __init__(self, steps):
        self.steps = steps

    def __iter__(self):
        for indices, labels in self.steps:
            yield list(zip(indices.tolist(), labels.tolist()))

    def __len__(self):
        return len(self.steps)


def baseline_loader(paths, steps, size, crop_scale, noaug_size=None, workers=2):
    """A DataLoader yielding (indices, labels, aug, noaug) for each step in `steps`."""
    return DataLoader(TwoViewDataset(paths, size, crop_scale, noaug_size=noaug_size),
                      batch_sampler=RowBatches(steps), num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None)
