"""Building the memory bank of a config (§7, §8) and the v2 initialisation pass over all images."""

import torch

from insclr import dist
from insclr.train.step import autocast, gather_uneven, noaug_features, set_train_mode, to_input


def build_bank(cfg_memory, neighbors, similarities, size, dim, device):
    """MemoryBankV1/V2 for memory.version (None for 'none'); neighbors/similarities: the pool arrays."""
    from insclr.mining import MemoryBankV1, MemoryBankV2

    if cfg_memory.version == "none":
        return None
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[cfg_memory.dtype]  # None: the bank's own choice (bank_dtype)
    if cfg_memory.version == "v1":
        return MemoryBankV1(neighbors, size, dim, cfg_memory.potential_positive, cfg_memory.get_size,
                            device=device, dtype=dtype, exclude_rows=cfg_memory.exclude_rows)
    if cfg_memory.version == "v2":
        return MemoryBankV2(neighbors, similarities, size, dim, cfg_memory.positive_thresh,
                            cfg_memory.negative_thresh, cfg_memory.mode, cfg_memory.get_size,
                            use_negative=cfg_memory.use_negative, device=device, dtype=dtype)
    raise ValueError(f"memory.version={cfg_memory.version!r}: expected none, v1 or v2")


@torch.no_grad()
def fill_bank_v2(ctx, loader, bar=None):
    """One eval-mode pass over every image (§8): enqueue the augmented- and no-aug-view features.

    `loader` yields TrainBatch for insclr.data.SequentialBatches; each rank sees its part, the
    features are gathered so every rank enqueues all of them and holds the same bank.
    Returns the number of images enqueued.
    """
    was_training = ctx.module.training
    ctx.module.eval()
    done = 0
    for batch in loader:
        with autocast(ctx.device, ctx.dtype):
            f = ctx.module(to_input(batch.aug, ctx.train.channels_last)).float()
        g = noaug_features(ctx, batch.noaug)
        indices = gather_uneven(batch.indices.to(ctx.device))
        ctx.bank.fill(indices, gather_uneven(f), gather_uneven(g))  # counter := 1, padded repeats harmless
        done += int(indices.shape[0])
        if bar is not None:
            bar.update(int(indices.shape[0]))
    if was_training:
        set_train_mode(ctx.module, ctx.train.freeze_bn)
    dist.barrier()
    return done
