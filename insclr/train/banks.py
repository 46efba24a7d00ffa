"""The initialisation pass of the memory banks that need one (bank v2, §8) over all images."""

import torch

from insclr import dist
from insclr.mining import Views
from insclr.train.step import autocast, gather_uneven, noaug_features, set_train_mode, to_input


@torch.no_grad()
def fill_bank(ctx, loader, bar=None):
    """One eval-mode pass over every image (§8): `fill` the bank with both views' features.

    `loader` yields TrainBatch for insclr.data.SequentialBatches; each rank sees its part, the
    features are gathered so every rank fills all of them and holds the same bank.
    Returns the number of images written.
    """
    was_training = ctx.module.training
    ctx.module.eval()
    done = 0
    for batch in loader:
        with autocast(ctx.device, ctx.dtype):
            f = ctx.module(to_input(batch.aug, ctx.train.channels_last)).float()
        g = noaug_features(ctx, batch.noaug)
        indices = gather_uneven(batch.indices.to(ctx.device))
        # counter := 1; the repeats padding the last batch write the same row twice, harmlessly
        ctx.bank.fill(indices, Views(gather_uneven(f), gather_uneven(g)))
        done += int(indices.shape[0])
        if bar is not None:
            bar.update(int(indices.shape[0]))
    if was_training:
        set_train_mode(ctx.module, ctx.train.freeze_bn)
    dist.barrier()
    return done
