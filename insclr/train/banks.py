"""The initialisation pass of the memory banks that need one (bank v2, §8) over all images."""

import torch

from insclr import dist
from insclr.mining import Views
from insclr.model import eval_mode
from insclr.train.step import forward, noaug_features


@torch.no_grad()
def fill_bank(state, settings, loader, bar=None):
    """One eval-mode pass over every image (§8): `fill` the bank with both views' features.

    `loader` yields TrainBatch for insclr.data.SequentialBatches; each rank sees its part, the
    features are gathered so every rank fills all of them and holds the same bank.
    Returns the number of images written.
    """
    done = 0
    with eval_mode(state.module, settings.freeze_bn):
        for batch in loader:
            f = forward(state, settings, batch.aug)
            g = noaug_features(state, settings, batch.noaug)
            indices = dist.all_gather_uneven(batch.indices.to(settings.device))
            # counter := 1; the repeats padding the last batch write the same row twice, harmlessly
            state.bank.fill(indices, Views(dist.all_gather_uneven(f), dist.all_gather_uneven(g)))
            done += int(indices.shape[0])
            if bar is not None:
                bar.update(int(indices.shape[0]))
    dist.barrier()
    return done
