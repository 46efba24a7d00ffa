"""One training step (ALGORITHM §4-§9): `train_step(state, settings, batch)`, separate from the loop.

`TrainState` holds what a step changes and a checkpoint saves (model, optimizer, scheduler,
scaler, memory bank, counters); `StepSettings` is the frozen part of the config a step reads.

DDP semantics: the configured batch is global. Rank r holds rows [its B/W anchors, their K
neighbours each]; the features are all-gathered (gradient kept for the local slice) and put back
into the §4 global order (all anchors, then all neighbours in anchor order), so every rank computes
exactly the single-process loss, selection and bank update. DDP averages gradients over ranks,
so the loss is multiplied by the world size before backward: the summed per-slice gradients are
then the single-process gradient.
"""

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from insclr import dist
from insclr.amp import amp_dtype, autocast
from insclr.loss import contrastive_loss
from insclr.mining import Views, select_positives
from insclr.model import eval_mode, multiscale_features


@dataclass(frozen=True)
class StepSettings:
    """What a step reads from the config, and nothing else (built once by `from_config`)."""

    k: int                          # data.k: neighbours per anchor (§4)
    world: int                      # ranks
    device: torch.device
    dtype: Optional[torch.dtype]    # autocast dtype of train.amp (None: float32)
    channels_last: bool
    freeze_bn: bool
    seed: int                       # train.seed: the bank draws are seeded from (seed, step)
    clip_grad: float                # 0 = off
    max_nonfinite: int
    noaug_scales: Optional[tuple]   # scales of the no-aug view (§5), None when noaug.enabled=false
    noaug_dtype: Optional[torch.dtype]  # autocast dtype of the no-aug forward (noaug.amp)
    selection_mode: str             # none | fixed | dynamic (§5)
    selection_thresh: float
    selection_always_true: int
    margin: float
    pos_margin: float
    memory_weight: float
    memory_start_step: int          # the bank is updated after this step ...
    memory_get_step: int            # ... and read after this one

    @classmethod
    def from_config(cls, cfg, device):
        t = cfg.train
        return cls(k=cfg.data.k, world=dist.world_size(), device=device, dtype=amp_dtype(t.amp, device),
                   channels_last=t.channels_last, freeze_bn=t.freeze_bn, seed=t.seed, clip_grad=t.clip_grad,
                   max_nonfinite=t.max_nonfinite,
                   noaug_scales=tuple(cfg.noaug.scales) if cfg.noaug.enabled else None,
                   noaug_dtype=amp_dtype(cfg.noaug.amp, device, key="noaug.amp"),
                   selection_mode=cfg.selection.mode, selection_thresh=cfg.selection.thresh,
                   selection_always_true=cfg.selection.always_true, margin=cfg.loss.margin,
                   pos_margin=cfg.loss.pos_margin, memory_weight=cfg.loss.memory_weight,
                   memory_start_step=cfg.memory.start_step, memory_get_step=cfg.memory.get_step)


@dataclass
class TrainState:
    """What a step changes and a checkpoint saves. `model` runs the augmented forward (maybe
    DDP/compiled); `module` is the bare model (no-gradient eval-mode forwards, saving); `bank` is
    a memory bank of insclr.mining (NoBank for memory.version=none). `step`: steps done."""

    model: Any
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    bank: Any
    step: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    generator: Optional[torch.Generator] = None   # reseeded every step: not state

    def state_dict(self):
        """Everything to save; "bank" is the bank's own state_dict (written to its own file)."""
        return {"step": self.step, "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "nonfinite_in_row": self.nonfinite_in_row, "nonfinite_total": self.nonfinite_total,
                "world_size": dist.world_size(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.bank.load_state_dict(state.get("bank", {}))
        self.step = int(state["step"])
        self.nonfinite_in_row, self.nonfinite_total = state["nonfinite_in_row"], state["nonfinite_total"]


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


def to_input(images, channels_last):
    """uint8 [B,3,H,W] on the device -> normalised float32 (channels_last when asked)."""
    from insclr.data import normalize

    return normalize(images, channels_last=channels_last)


def forward(state, settings, images):
    """The bare model on uint8 images [R,3,S,S] under autocast: float32 [R, D] (eval mode inside an
    `eval_mode` block, e.g. the bank's initial pass)."""
    with autocast(settings.device, settings.dtype):
        return state.module(to_input(images, settings.channels_last)).float()


def noaug_features(state, settings, noaug):
    """Multi-scale no-aug features of the local rows: eval mode, no gradient, autocast by noaug.amp
    (default none: float32, so the selection cut decides as the original's float32) (§5). float32 [R, D]."""
    with torch.no_grad(), eval_mode(state.module, settings.freeze_bn), \
            autocast(settings.device, settings.noaug_dtype):
        g = multiscale_features(state.module, to_input(noaug, settings.channels_last), settings.noaug_scales)
    return g.float()


def _bank_generator(state, settings, step):
    """Seeded from (seed, step): every rank draws the same memory negatives, and a resumed run too."""
    if state.generator is None:
        state.generator = torch.Generator(device=settings.device)  # banks live on the training device
    state.generator.manual_seed(settings.seed * 1_000_003 + step)
    return state.generator


def _prefixed(prefix, stats):
    """{prefix + key: number} of `stats`: Python numbers as floats; a tensor as its float32 mean
    (float64 stays float64: the loss's pair counts per row), a 0-d tensor left on the device."""
    out = {}
    for key, value in (stats or {}).items():
        if torch.is_tensor(value):
            value = (value if value.dtype == torch.float64 else value.float()).mean() if value.numel() else 0.0
            out[f"{prefix}{key}"] = value
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = float(value)
    return out


def gather_batch(state, settings, batch):
    """(order, indices, labels [B(K+1)], no-aug features g [B(K+1), D] or None), global, in §4 order."""
    order = global_order(settings.world, batch.indices.shape[0] // (settings.k + 1), settings.k, settings.device)
    # non_blocking: a copy from pageable host memory is staged at once; the blocking form waits for the GPU
    indices = dist.all_gather(batch.indices.to(settings.device, non_blocking=True))[order]
    labels = dist.all_gather(batch.labels.to(settings.device, non_blocking=True))[order]
    g = None
    if settings.noaug_scales is not None:
        g = dist.all_gather(noaug_features(state, settings, batch.noaug))[order]
    return order, indices, labels, g


def select(settings, labels, g):
    """In-batch positive selection (§5) on the global no-aug features; returns (labels, kept count)."""
    if settings.selection_mode == "none":
        return labels, None
    if g is None:
        raise ValueError(f"selection.mode={settings.selection_mode!r} needs the no-aug view: set noaug.enabled=true")
    b = labels.shape[0] // (settings.k + 1)
    labels = select_positives(g[:b], g[b:], labels, settings.selection_mode, settings.selection_thresh,
                              settings.selection_always_true)
    return labels, (labels[b:] > 0).sum()  # a device count, read with the step's other figures


def memory_loss(state, settings, step, indices, labels, f, g, finite):
    """Update the bank with this step's rows, then the memory loss against its `get` (§7, §8).

    finite: bool 0-d device tensor, whether f and g are finite. Returns (loss or None, stats,
    Overwritten or None: what the update replaced, for `bank.restore` if the step is skipped);
    the loss is None before memory.get_step and for memory.version=none.
    """
    overwritten = None
    if step > settings.memory_start_step:
        # a non-finite step writes zeros (restored after the step's check), so that no NaN reaches
        # the mining's comparisons; on a finite step this is f and g bit for bit
        rows = Views(torch.where(finite, f.detach(), 0.0), None if g is None else torch.where(finite, g, 0.0))
        overwritten = state.bank.update(indices, rows)
    if step <= settings.memory_get_step:
        return None, {}, overwritten
    got = state.bank.get(indices, labels, generator=_bank_generator(state, settings, step))
    if got is None:
        return None, {}, overwritten
    loss, lstats = contrastive_loss(f, labels, got.features.to(f.dtype), got.labels, settings.margin,
                                    settings.pos_margin, memory=True)
    return loss, {**_prefixed("memory_", lstats), **_prefixed("mining_", got.stats)}, overwritten


def _saved_buffers(state, settings):
    """Copies of the model's buffers (BatchNorm running statistics, which the augmented forward in
    train mode updates; none to save with train.freeze_bn), put back when the step is skipped: a
    non-finite forward must not leave NaN running statistics behind. Device copies, no host read."""
    if settings.freeze_bn:
        return None
    return [b.detach().clone() for b in state.module.buffers()]


def _skip(state, settings, step, why):
    """A non-finite loss: nothing is updated on any rank (the caller has restored the bank); too
    many in a row stop the run."""
    state.optimizer.zero_grad(set_to_none=True)
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    if state.nonfinite_in_row > settings.max_nonfinite:
        raise FloatingPointError(
            f"step {step}: {state.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite="
            f"{settings.max_nonfinite}); stopping. Lower train.lr, set train.clip_grad, or try train.amp=none.")
    state.scheduler.step()
    return {"skipped": 1, "nonfinite": why, "nonfinite_total": state.nonfinite_total,
            "lr": state.optimizer.param_groups[0]["lr"]}


def _update(state, settings, loss):
    """Backward of world × loss (DDP averages), optional clipping, optimizer and LR steps. -> grad norm."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss * settings.world).backward()
    state.scaler.unscale_(state.optimizer)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    limit = settings.clip_grad if settings.clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    return grad_norm


def _figure(value):
    """A figure of the step's record: detached float32 on the device (read by the loop, not here)."""
    return value.detach().float()


def train_step(state, settings, batch):
    """Step state.step + 1 on this rank's rows; advances state.step.

    batch: a TrainBatch (insclr.data) or anything with indices, labels int64 [R] (R = B/W·(K+1),
    this rank's anchors then their neighbours), aug uint8 [R,3,S,S] and noaug uint8
    [R,3,S',S'] or None. Returns the step's metrics, identical on every rank: numbers, or 0-d
    device tensors (losses, grad norm, counts) that insclr.train.metrics.read_records turns into
    numbers, many steps in one copy. The step reads the device once: the finite check.
    """
    state.step += 1
    step = state.step
    order, indices, labels, g = gather_batch(state, settings, batch)
    labels, kept = select(settings, labels, g)
    buffers = _saved_buffers(state, settings)
    with autocast(settings.device, settings.dtype):
        f_local = state.model(to_input(batch.aug, settings.channels_last))
    f = dist.all_gather_with_grad(f_local.float())[order]
    batch_loss, bstats = contrastive_loss(f, labels, f, labels, settings.margin, settings.pos_margin)
    finite = torch.isfinite(batch_loss) & torch.isfinite(f).all()
    if g is not None:  # g goes into bank v2's no-aug table
        finite &= torch.isfinite(g).all()
    mem_loss, mstats, overwritten = memory_loss(state, settings, step, indices, labels, f, g, finite)
    loss = batch_loss if mem_loss is None else batch_loss + settings.memory_weight * mem_loss
    # the step's one host read: both flags, reduced over the ranks on the device, in one copy; a
    # non-finite step is undone (bank rows restored) and skipped by every rank
    bad_batch, bad_memory = dist.any_rank_flags(torch.stack([~finite, ~torch.isfinite(loss)])).tolist()
    if bad_batch or bad_memory:
        if overwritten is not None:
            state.bank.restore(overwritten)
        if buffers is not None:
            torch._foreach_copy_(list(state.module.buffers()), buffers)
        return _skip(state, settings, step, "batch" if bad_batch else "memory")
    lr = state.optimizer.param_groups[0]["lr"]
    grad_norm = _update(state, settings, loss)
    state.nonfinite_in_row = 0
    record = {"loss": _figure(loss), "batch_loss": _figure(batch_loss),
              "memory_loss": _figure(mem_loss) if mem_loss is not None else 0.0,
              "lr": lr, "grad_norm": _figure(grad_norm), "skipped": 0}
    if kept is not None:
        record["selected"] = kept
    record.update(_prefixed("batch_", bstats))
    record.update(mstats)
    return record
