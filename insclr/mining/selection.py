"""In-batch positive selection (ALGORITHM §5), pool boundaries (§8) and the sampling rule.

Pure tensor functions; the memory banks and the training loop build on them.
"""

import numpy as np
import torch

SELECTION_MODES = ("none", "fixed", "dynamic")


def select_positives(anchor_noaug, neighbor_noaug, labels, mode, thresh, always_true=0):
    """Reject in-batch neighbours whose no-aug feature is too far from their anchor's (§5).

    anchor_noaug: [B, D] no-aug features g of the anchors; neighbor_noaug: [B*K, D] of their
    neighbours (anchor 0's K neighbours first, §4 order); labels: long [B*(K+1)] the step's
    labels in §4 order (anchors, then neighbours). mode: "fixed" keeps s >= thresh, "dynamic"
    keeps s / max_n s >= thresh ("none" keeps all); the first `always_true` neighbours of each
    anchor are always kept. Returns new labels long [B*(K+1)]: a rejected neighbour's label
    becomes -(label of its anchor).
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"selection mode {mode!r}: expected one of {', '.join(SELECTION_MODES)}")
    b = anchor_noaug.shape[0]
    if b == 0 or neighbor_noaug.shape[0] % b:
        raise ValueError(f"select_positives: {neighbor_noaug.shape[0]} neighbour rows is not a multiple "
                         f"of {b} anchors")
    k = neighbor_noaug.shape[0] // b
    if labels.shape != (b * (k + 1),):
        raise ValueError(f"select_positives: labels {tuple(labels.shape)} do not match {b} anchors x (1 + {k})")
    labels = labels.clone()
    if mode == "none" or k == 0:
        return labels
    g_a = anchor_noaug.float()[:, None, :]
    g_n = neighbor_noaug.float().view(b, k, -1)
    sims = (g_a * g_n).sum(-1)                                        # [B, K]
    if mode == "fixed":
        keep = sims >= thresh
    else:
        keep = sims / sims.max(dim=1, keepdim=True).values >= thresh
    keep[:, :always_true] = True
    anchor_labels = labels[:b].repeat_interleave(k)
    labels[b:] = torch.where(keep.flatten(), labels[b:], -anchor_labels)
    return labels


def boundaries(similarities, thresh, chunk=8192):
    """Per row, the number of leading similarities >= thresh (§8 pb / nb).

    similarities: [N, k] (numpy or tensor, any float dtype; rows sorted descending as the
    pool stores them). Compared in float32. Returns LongTensor [N] on the input's device
    (CPU for numpy). Processed in row chunks so N = 1.2M, k = 500 needs no big temporary.
    """
    if isinstance(similarities, np.ndarray):
        similarities = torch.from_numpy(similarities)
    if similarities.ndim != 2:
        raise ValueError(f"boundaries: similarities must be [N, k], got {tuple(similarities.shape)}")
    n, k = similarities.shape
    out = torch.empty(n, dtype=torch.long, device=similarities.device)
    # comparing in the stored dtype gives the float32 answer when thresh is exact in that dtype
    exact = torch.tensor(thresh, dtype=similarities.dtype).item() == thresh
    for start in range(0, n, chunk):
        block = similarities[start:start + chunk]
        below = (block if exact else block.float()) < thresh
        # index of the first entry below thresh = number of leading entries >= thresh
        first_below = below.to(torch.uint8).argmax(dim=1)
        out[start:start + chunk] = torch.where(below.any(dim=1), first_below, k)
    return out


def sample_without_replacement(pool, n, generator=None):
    """`n` entries of the 1-D tensor `pool` without replacement, in draw order.

    The one sampling rule of the banks (and of the reference loops in insclr/bench/reference_insclr.py): a random
    permutation of len(pool) from `generator` (or the global RNG on pool's device), first n.
    The same pool and generator state give the same sample.
    """
    device = generator.device if generator is not None else pool.device
    perm = torch.randperm(len(pool), generator=generator, device=device)[:n]
    return pool[perm.to(pool.device)]
