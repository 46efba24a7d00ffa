"""contrastive_loss against the per-row loop reference and closed forms (ALGORITHM §6)."""

import pytest
import torch
import torch.nn.functional as F

from insclr.loss import contrastive_loss

U = torch.finfo(torch.float32).eps / 2  # float32 unit roundoff
from insclr.bench.reference_insclr import loss_loop


def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _check(x, xl, ref, rl, margin, pos_margin=0.0, memory=False):
    """Loss, stats and gradients of x (and ref when it is a leaf) equal the loop reference."""
    x.grad = ref.grad = None
    ours, s1 = contrastive_loss(x, xl, ref, rl, margin, pos_margin, memory)
    ours.backward()
    grads = [t.grad.clone() for t in (x, ref) if t.grad is not None]
    for t in (x, ref):
        t.grad = None
    theirs, s2 = loss_loop(x, xl, ref, rl, margin, pos_margin, memory)
    theirs.backward()
    # Both sides work in float32 on the same similarities and sum the hinge terms in other orders.
    # The loss is a mean of at most R·M non-negative terms: reordering moves it by at most R·M·u
    # relative (Higham §4.2); a gradient row sums at most M (or R) terms of size <= 1 (unit rows).
    n = x.shape[0] * ref.shape[0]
    assert torch.allclose(ours, theirs.float(), rtol=max(n * U, 1e-5), atol=1e-5)
    assert s1 == pytest.approx(s2)
    for got, t in zip(grads, [t for t in (x, ref) if t.grad is not None]):
        assert torch.allclose(got, t.grad, atol=max(n / min(x.shape[0], ref.shape[0]) * U, 1e-5))
    return ours, s1


def test_batch_mode_matches_loop():
    x = _rows(24, 8, 0).requires_grad_()
    labels = torch.arange(6).repeat_interleave(4) + 1
    labels[5] = -labels[5]
    loss, stats = _check(x, labels, x, labels, margin=0.2)
    assert stats["pos_per_row"] > 0 and stats["neg_per_row"] > 0 and loss > 0


@pytest.mark.parametrize("pos_margin", [0.0, 0.3])
def test_memory_mode_matches_loop_dense_and_sparse(pos_margin):
    x = _rows(12, 16, 1).requires_grad_()
    xl = torch.tensor([1, 2, 3, -1, 1, 2, 3, -2, 4, 4, 0, 5])
    # many reference rows with few active pairs exercises the sparse backward; a small ref the dense one
    for m, margin, same in ((4000, 0.6, 40), (30, 0.1, 30)):
        ref = _rows(m, 16, 2 + m)
        rl = torch.full((m,), 99)
        rl[:same] = torch.randint(1, 7, (same,), generator=torch.Generator().manual_seed(m))
        loss, stats = _check(x, xl, ref, rl, margin, pos_margin, memory=True)
        assert stats["pos_per_row"] > 0 and stats["neg_per_row"] > 0
        if m > 1000:    # the sparse backward is the one under test here
            assert (stats["pos_per_row"] + stats["neg_per_row"]) / m < 1 / 32


def test_memory_mode_drops_nonpositive_rows():
    x = _rows(4, 8, 3)
    ref = _rows(10, 8, 4)
    rl = torch.full((10,), 99)
    xl = torch.tensor([1, -1, 0, 2])
    full, _ = contrastive_loss(x, xl, ref, rl, 0.0, memory=True)
    kept, _ = contrastive_loss(x[[0, 3]], xl[[0, 3]], ref, rl, 0.0)
    assert torch.allclose(full, kept)


def test_closed_form_two_rows():
    # x0 . r0 = 0.8 (same label: positive, 1 - 0.8), x0 . r1 = 0.6 (other label, > margin: + 0.6)
    x = torch.tensor([[1.0, 0.0]])
    ref = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    loss, stats = contrastive_loss(x, torch.tensor([1]), ref, torch.tensor([1, 2, 2]), margin=0.4)
    assert loss.item() == pytest.approx(0.2 + 0.6)
    assert stats == {"pos_per_row": 1.0, "neg_per_row": 1.0}
    # the row itself (S = 1) is never a positive pair
    loss, stats = contrastive_loss(x, torch.tensor([1]), x, torch.tensor([1]), margin=0.4)
    assert loss.item() == 0.0 and stats["pos_per_row"] == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    x = _rows(16, 32, 5).to(dtype).requires_grad_()
    labels = torch.arange(4).repeat_interleave(4) + 1
    loss, _ = contrastive_loss(x, labels, x, labels, margin=0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    ref, _ = loss_loop(x.detach(), labels, x.detach(), labels, 0.1)
    assert torch.allclose(loss, ref, rtol=16 * 16 * U)  # float32 on both sides from the same inputs: R·M terms


def test_under_autocast_and_empty_rows():
    x = _rows(8, 8, 6).requires_grad_()
    labels = torch.arange(8) // 2 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = contrastive_loss(x, labels, x, labels, margin=0.2)
    ref, _ = loss_loop(x, labels, x, labels, 0.2)
    assert torch.allclose(loss, ref, rtol=1e-5)  # the loss leaves autocast: float32 like the loop, 8·8 terms (64 u)
    empty, stats = contrastive_loss(x, -labels, x.detach(), labels, 0.2, memory=True)
    empty.backward()
    assert empty.item() == 0.0 and stats["pos_per_row"] == 0.0


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="x .* and ref"):
        contrastive_loss(torch.zeros(2, 3), torch.ones(2, dtype=torch.long), torch.zeros(2, 4),
                         torch.ones(2, dtype=torch.long), 0.4)
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(torch.zeros(2, 3), torch.ones(3, dtype=torch.long), torch.zeros(2, 3),
                         torch.ones(2, dtype=torch.long), 0.4)
