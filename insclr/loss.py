"""The contrastive loss of InsCLR (ALGORITHM §6), without a per-row loop.

The similarity matrix S is computed once in float32 without autograd; only the pairs that
contribute (positives below 1 - 1e-6 - pos_margin, negatives above the margin) enter the
backward pass. Against a memory bank of 100k rows almost every pair is inactive, so the
backward touches a few hundred bank rows instead of multiplying by all of them again.
"""

import torch

EPS = 1e-6

# Sparse backward when the active pairs are fewer than this fraction of all pairs: a gathered
# row costs about as much memory traffic as ~this many matmul columns.
_SPARSE_FRACTION = 1.0 / 32


def pair_masks(sims, x_labels, ref_labels, margin, pos_margin=0.0):
    """Positive and negative pair masks of §6.

    sims: float [n, m]; x_labels: long [n]; ref_labels: long [m].
    Returns (pos bool [n, m], neg bool [n, m]).
    """
    same = x_labels[:, None] == ref_labels[None, :]
    pos = same & (sims < 1.0 - EPS - pos_margin)
    neg = ~same & (sims > margin)
    return pos, neg


class _PairLoss(torch.autograd.Function):
    """sum_{P} (1 - S) + sum_{N} S over n rows, divided by n; S = x @ ref.T in float32."""

    @staticmethod
    def forward(ctx, x, ref, x_labels, ref_labels, margin, pos_margin):
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, rf = x.float(), ref.float()
            sims = xf @ rf.T
            pos, neg = pair_masks(sims, x_labels, ref_labels, margin, pos_margin)
            n = x.shape[0]
            loss = (torch.where(pos, 1.0 - sims, 0.0).sum() + torch.where(neg, sims, 0.0).sum()) / n
        ctx.save_for_backward(x, ref, pos, neg)
        ctx.mark_non_differentiable(pos, neg)
        return loss, pos, neg

    @staticmethod
    def backward(ctx, grad_loss, _gpos, _gneg):
        x, ref, pos, neg = ctx.saved_tensors
        n = x.shape[0]
        need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_ref = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, rf = x.float(), ref.float()
            scale = grad_loss.float() / n
            rows, cols = torch.nonzero(pos | neg, as_tuple=True)
            if rows.numel() <= _SPARSE_FRACTION * pos.numel():
                # d loss / d S_ij is -1 for positives and +1 for negatives (times scale)
                coef = (neg[rows, cols].float() * 2.0 - 1.0) * scale
                if need_x:
                    grad_x = torch.zeros_like(xf).index_add_(0, rows, coef[:, None] * rf[cols])
                if need_ref:
                    grad_ref = torch.zeros_like(rf).index_add_(0, cols, coef[:, None] * xf[rows])
            else:
                g = (neg.float() - pos.float()) * scale
                if need_x:
                    grad_x = g @ rf
                if need_ref:
                    grad_ref = g.T @ xf
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_ref is not None:
            grad_ref = grad_ref.to(ref.dtype)
        return grad_x, grad_ref, None, None, None, None


def contrastive_loss(x, x_labels, ref, ref_labels, margin, pos_margin=0.0, memory=False):
    """Contrastive loss of ALGORITHM §6.

    x: [n, D] query rows (fp32/bf16/fp16, L2-normalised); x_labels: long [n];
    ref: [m, D] reference rows; ref_labels: long [m]. Batch mode: pass x as ref.
    memory=True drops the rows of x whose label is <= 0 first (§6, memory mode).
    Returns (loss: float32 scalar tensor, stats: {"pos_per_row", "neg_per_row"}: the mean numbers
    of positive and negative pairs per kept row, float64 0-d tensors on x's device (floats 0.0
    when no row is kept); nothing is read to the host, the training loop reads them with the
    step's other figures).
    """
    if x.ndim != 2 or ref.ndim != 2 or x.shape[1] != ref.shape[1]:
        raise ValueError(f"contrastive_loss: x {tuple(x.shape)} and ref {tuple(ref.shape)} must be [n, D] and [m, D]")
    if x_labels.shape != (x.shape[0],) or ref_labels.shape != (ref.shape[0],):
        raise ValueError(f"contrastive_loss: labels {tuple(x_labels.shape)}, {tuple(ref_labels.shape)} "
                         f"do not match x {tuple(x.shape)}, ref {tuple(ref.shape)}")
    if memory:
        # the kept rows as indices: the same rows as the mask, and a backward (index_put of
        # indices) that does not turn the mask into indices again, which would read the device
        rows = (x_labels > 0).nonzero().squeeze(1)
        x, x_labels = x[rows], x_labels[rows]
    n = x.shape[0]
    if n == 0 or ref.shape[0] == 0:
        # keep the result connected to the graph so that backward() still works
        return x.float().sum() * 0.0, {"pos_per_row": 0.0, "neg_per_row": 0.0}
    loss, pos, neg = _PairLoss.apply(x, ref, x_labels, ref_labels, float(margin), float(pos_margin))
    # float64: the correctly rounded count / n, the value Python's division of the counts gives
    per_row = torch.stack([pos.sum(), neg.sum()]).double() / n
    return loss, {"pos_per_row": per_row[0], "neg_per_row": per_row[1]}
