"""One training step (ALGORITHM §4-§9), separate from the loop that feeds it.

DDP semantics: the configured batch is global. Rank r holds rows [its B/W anchors, their K
neighbours each]; the features are all-gathered (gradient kept for the local slice) and put back
into the §4 global order (all anchors, then all neighbours in anchor order), so every rank computes
exactly the single-process loss, selection and bank update. DDP averages gradients over ranks,
so the loss is multiplied by the world size before backward: the summed per-slice gradients are
then the single-process gradient.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as tdist

from insclr import dist


def global_order(world, local_anchors, k, device=None):
    """Permutation: rows gathered in rank order -> §4 global order.

    Gathered layout: for each rank r, `local_anchors` anchors then their `local_anchors*k`
    neighbours. Returns LongTensor [world * local_anchors * (k+1)] with out = gathered[order].
    """
    rows = local_anchors * (k + 1)
    base = torch.arange(world, device=device).unsqueeze(1) * rows
    anchors = (base + torch.arange(local_anchors, device=device)).reshape(-1)
    neighbours = (base + local_anchors + torch.arange(local_anchors * k, device=device)).reshape(-1)
    return torch.cat([anchors, neighbours])


def gather_uneven(x):
    """Concatenate `x` [n_r, ...] from every rank (rank order) when n_r differs between ranks. No gradient."""
    if not dist.is_initialized() or dist.world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = dist.all_gather(n).tolist()
    padded = torch.zeros((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = dist.all_gather(padded).chunk(len(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def any_rank(flag, device):
    """True on every rank when `flag` is true on any rank (one all-reduce of a device scalar)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def amp_dtype(amp, device):
    """train.amp -> the autocast dtype, or None for float32. 'auto': bf16 on CUDA, none on the CPU."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp not in table:
        raise ValueError(f"train.amp={amp!r}: expected auto, bf16, fp16 or none")
    return table[amp]


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_train_mode(model, freeze_bn):
    """model.train(), with BatchNorm kept in eval mode (running statistics) when `freeze_bn`."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def to_input(images, channels_last):
    """uint8 [B,3,H,W] on the device -> normalised float32 (channels_last when asked)."""
    from insclr.data import normalize

    return normalize(images, channels_last=channels_last)


@dataclass
class StepContext:
    """Everything a step touches. `model` runs the augmented forward (maybe DDP/compiled);
    `module` is the bare model, used for the no-gradient eval-mode forwards."""
    model: Any
    module: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    bank: Optional[Any]
    loss: Any          # LossConfig
    selection: Any     # SelectionConfig
    noaug: Any         # NoAugConfig
    memory: Any        # MemoryConfig
    train: Any         # TrainConfig
    device: Any
    k: int
    dtype: Optional[torch.dtype] = None
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    generator: Any = field(default=None)

    @property
    def world(self):
        return dist.world_size()


def noaug_features(ctx, noaug):
    """Multi-scale no-aug features of the local rows: eval mode, no gradient, autocast by noaug.amp
    (default none: float32, so the selection cut decides as the original's float32) (§5). float32 [R, D]."""
    from insclr.model import multiscale_features

    was_training = ctx.module.training
    ctx.module.eval()
    with torch.no_grad(), autocast(ctx.device, amp_dtype(ctx.noaug.amp, ctx.device)):
        g = multiscale_features(ctx.module, to_input(noaug, ctx.train.channels_last), ctx.noaug.scales)
    set_train_mode(ctx.module, ctx.train.freeze_bn) if was_training else None
    return g.float()


def _bank_generator(ctx, step):
    """Seeded from (seed, step): every rank draws the same memory negatives, and a resumed run too."""
    if ctx.generator is None:
        ctx.generator = torch.Generator(device=ctx.device)  # banks live on the training device
    ctx.generator.manual_seed(ctx.train.seed * 1_000_003 + step)
    return ctx.generator


def _prefixed(prefix, stats):
    out = {}
    for key, value in (stats or {}).items():
        if torch.is_tensor(value):
            value = value.float().mean().item() if value.numel() else 0.0
        if isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = float(value)
    return out


def gather_rows(ctx, indices, labels, noaug):
    """Global indices, labels [B(K+1)] and no-aug features g [B(K+1), D] (or None) in §4 order."""
    order = global_order(ctx.world, indices.shape[0] // (ctx.k + 1), ctx.k, ctx.device)
    indices = dist.all_gather(indices.to(ctx.device))[order]
    labels = dist.all_gather(labels.to(ctx.device))[order]
    g = dist.all_gather(noaug_features(ctx, noaug))[order] if ctx.noaug.enabled else None
    return order, indices, labels, g


def select(ctx, labels, g):
    """In-batch positive selection (§5) on the global no-aug features; returns (labels, kept count)."""
    from insclr.mining import select_positives

    if ctx.selection.mode == "none":
        return labels, None
    if g is None:
        raise ValueError(f"selection.mode={ctx.selection.mode!r} needs the no-aug view: set noaug.enabled=true")
    b = labels.shape[0] // (ctx.k + 1)
    labels = select_positives(g[:b], g[b:], labels, ctx.selection.mode, ctx.selection.thresh,
                              ctx.selection.always_true)
    return labels, int((labels[b:] > 0).sum().item())


def memory_loss(ctx, step, indices, labels, f, g):
    """Enqueue this step's rows, then the memory loss against the bank's get (§7, §8). (loss|None, stats)."""
    from insclr.loss import contrastive_loss

    mem = ctx.memory
    if ctx.bank is None or mem.version == "none":
        return None, {}
    if step > mem.start_step:
        if mem.version == "v2":
            ctx.bank.enqueue(indices, f.detach(), g)
        else:
            ctx.bank.enqueue(indices, f.detach())
    if step <= mem.get_step:
        return None, {}
    ref, ref_labels, stats = ctx.bank.get(indices, labels, generator=_bank_generator(ctx, step))
    loss, lstats = contrastive_loss(f, labels, ref.to(f.dtype), ref_labels, ctx.loss.margin,
                                    ctx.loss.pos_margin, memory=True)
    return loss, {**_prefixed("memory_", lstats), **_prefixed("mining_", stats)}


def _skip(ctx, step, why):
    """A non-finite loss: nothing is updated on any rank; too many in a row stop the run."""
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.nonfinite_in_row += 1
    ctx.nonfinite_total += 1
    if ctx.nonfinite_in_row > ctx.train.max_nonfinite:
        raise FloatingPointError(
            f"step {step}: {ctx.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite="
            f"{ctx.train.max_nonfinite}); stopping. Lower train.lr, set train.clip_grad, or try train.amp=none.")
    ctx.scheduler.step()
    return {"skipped": 1, "nonfinite": why, "nonfinite_total": ctx.nonfinite_total,
            "lr": ctx.optimizer.param_groups[0]["lr"]}


def _update(ctx, loss):
    """Backward of world × loss (DDP averages), optional clipping, optimizer and LR steps. -> grad norm."""
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss * ctx.world).backward()
    ctx.scaler.unscale_(ctx.optimizer)
    params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
    limit = ctx.train.clip_grad if ctx.train.clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.scheduler.step()
    return grad_norm


def train_step(ctx, step, indices, labels, aug, noaug=None):
    """One optimisation step on this rank's rows.

    indices, labels: int64 [R] (R = B/W·(K+1), this rank's anchors then their neighbours);
    aug: uint8 [R,3,S,S]; noaug: uint8 [R,3,S',S'] or None. `step` counts from 1.
    Returns the step's metrics (floats), identical on every rank.
    """
    order, indices, labels, g = gather_rows(ctx, indices, labels, noaug)
    labels, kept = select(ctx, labels, g)
    with autocast(ctx.device, ctx.dtype):
        f_local = ctx.model(to_input(aug, ctx.train.channels_last))
    f = dist.all_gather_with_grad(f_local.float())[order]
    from insclr.loss import contrastive_loss

    batch_loss, bstats = contrastive_loss(f, labels, f, labels, ctx.loss.margin, ctx.loss.pos_margin)
    if step == ctx.train.debug_nan_step and ctx.train.debug_nan_rank in (-1, dist.rank()):
        batch_loss = batch_loss * float("nan")  # test hook: a divergence seen by one rank only
    # checked before the enqueue so that a bad step leaves the banks untouched as well
    if any_rank(not bool(torch.isfinite(batch_loss).item() and torch.isfinite(f).all().item()), ctx.device):
        return _skip(ctx, step, "batch")
    mem_loss, mstats = memory_loss(ctx, step, indices, labels, f, g)
    loss = batch_loss if mem_loss is None else batch_loss + ctx.loss.memory_weight * mem_loss
    if any_rank(not bool(torch.isfinite(loss).item()), ctx.device):
        return _skip(ctx, step, "memory")
    lr = ctx.optimizer.param_groups[0]["lr"]
    grad_norm = _update(ctx, loss)
    ctx.nonfinite_in_row = 0
    record = {"loss": loss.item(), "batch_loss": batch_loss.item(),
              "memory_loss": mem_loss.item() if mem_loss is not None else 0.0,
              "lr": lr, "grad_norm": float(grad_norm), "skipped": 0}
    if kept is not None:
        record["selected"] = kept
    record.update(_prefixed("batch_", bstats))
    record.update(mstats)
    return record
