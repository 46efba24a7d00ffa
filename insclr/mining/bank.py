"""The memory bank interface (STYLE 11) and the storage the banks share.

Every bank (`NoBank`, `MemoryBankV1`, `MemoryBankV2`) answers the same calls, so the training
step never asks which one it holds:

- `update(indices, views) -> Overwritten`: write this step's detached features at their dataset
  indices (counter += 1) and return what the write replaced;
- `restore(overwritten)`: put those rows back (a skipped step leaves the bank as it was);
- `fill(indices, views)`: the initial pass over all images (counter := 1), needed by the banks
  whose `needs_fill` is true;
- `get(indices, labels, generator) -> MemoryRows | None`: the memory rows for the step's loss
  (None: no bank);
- `state_dict()` / `load_state_dict(state)`.

`views` is a `Views(aug, noaug)`: each bank takes the views it stores.
"""

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import torch


class Views(NamedTuple):
    """The features of a step's rows: aug float [R, D] (augmented view, the model's output) and
    noaug float [R, D] or None (the multi-scale no-aug view, §5; bank v2 needs it)."""

    aug: torch.Tensor
    noaug: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class MemoryRows:
    """What `get` returns: features [G, D] bank rows (a view of a buffer the next `get`
    overwrites: run the memory loss's backward before it; autograd raises otherwise);
    labels long [G] (group label for pseudo-positives, N + 1 for negatives); rows long [G] the
    dataset indices behind them; stats: numbers for the metrics."""

    features: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    stats: dict = field(default_factory=dict)


class Overwritten(NamedTuple):
    """What an `update` replaced: indices long [R] and, per table (counter included), the old
    rows at those indices ([R, D] or [R]). Small (the step's rows only); `restore` writes them back."""

    indices: torch.Tensor
    rows: dict


class NoBank:
    """memory.version=none: no memory loss; nothing stored, nothing saved."""

    needs_fill = False

    def update(self, indices, views):
        return Overwritten(indices, {})

    def restore(self, overwritten):
        pass

    def fill(self, indices, views):
        pass

    def get(self, indices, labels=None, generator=None):
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"memory bank state has tables {sorted(state)} but memory.version=none keeps none")


def bank_dtype(device, dtype=None):
    """float32 on the CPU; bfloat16 on a GPU unless `dtype` says otherwise."""
    if dtype is not None:
        return dtype
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def as_tensor(array, what, device, dtype=None):
    """A pool array (numpy or tensor) as a tensor on `device`, with a clear error for bad input."""
    if isinstance(array, np.ndarray):
        array = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(array, torch.Tensor) or array.ndim != 2:
        got = getattr(array, "shape", type(array))
        raise ValueError(f"{what} must be a 2-D numpy array or tensor [N, k], got {got}")
    return array.to(device=device, dtype=dtype if dtype is not None else array.dtype)


class FeatureBank:
    """`names` feature tables of [size, dim] plus an update counter per row.

    Rows are written by index (the dataset index of the image), so every rank that sees the
    same all-gathered batches holds the same bank. Subclasses say which views they store
    (`_tables`) and how they choose rows (`select_rows`).
    """

    needs_fill = False

    def __init__(self, size, dim, names, device="cpu", dtype=None):
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory bank size {size} and dim {dim} must be positive")
        self.size, self.dim, self.device = int(size), int(dim), torch.device(device)
        self.dtype = bank_dtype(self.device, dtype)
        self.names = tuple(names)
        for name in self.names:
            setattr(self, name, torch.zeros(self.size, self.dim, dtype=self.dtype, device=self.device))
        self.counter = torch.zeros(self.size, dtype=torch.int32, device=self.device)
        self._buffers = {}

    def gather(self, name, rows):
        """Rows [G, D] of table `name` at dataset indices `rows`, in a buffer reused by every call.

        Gathering 100k x 2048 rows into fresh memory costs page faults on every step (several
        times the copy itself on the CPU); the returned view is overwritten by the next gather
        of the same table. Autograd checks this: a backward that needs these rows after the
        next `get` raises instead of using overwritten values.
        """
        table = getattr(self, name)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < len(rows):
            buffer = torch.empty(len(rows), self.dim, dtype=self.dtype, device=self.device)
            self._buffers[name] = buffer
        out = buffer[:len(rows)]
        torch.index_select(table, 0, rows, out=out)
        return out

    def _tables(self, views):
        """The tensors of `views` aligned with self.names."""
        raise NotImplementedError

    def update(self, indices, views):
        """Write the detached features of `views` (Views, [R, D] each) at the dataset indices [R];
        counter += 1 (once per call, even for an index twice in the step, as the original).

        Returns the Overwritten rows, for `restore`. The index range is not checked here (that
        would read the device every step): the step's indices come from the sampler over a pool
        whose indices `load_pool` checked; `fill` checks them.
        """
        feats = self._tables(views)
        indices = self._check_shapes(indices, *feats)
        names = self.names + ("counter",)
        overwritten = Overwritten(indices, {name: getattr(self, name)[indices] for name in names})
        self._write(indices, feats, "add")
        return overwritten

    def restore(self, overwritten):
        """Write back the rows an `update` replaced (Overwritten): the bank is bit for bit as
        before that update. An index twice in the update holds the same old row twice."""
        for name, rows in overwritten.rows.items():
            getattr(self, name)[overwritten.indices] = rows

    def fill(self, indices, views):
        """Write `views` at indices with counter = 1 (an initial pass over the images)."""
        feats = self._tables(views)
        indices = self._check_shapes(indices, *feats)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.size):
            raise ValueError(f"memory bank: indices must lie in [0, {self.size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        self._write(indices, feats, "set")

    def select_rows(self, indices, labels=None, generator=None):
        """(rows long [G], labels long [G], stats dict): which dataset indices `get` returns."""
        raise NotImplementedError

    def get(self, indices, labels=None, generator=None):
        """Memory rows for the step's memory loss: MemoryRows of the augmented bank rows.

        indices, labels: long [R] the step's dataset indices and labels (all ranks, §4 order);
        generator: torch.Generator for the random draws (seed it identically on every rank).
        """
        rows, row_labels, stats = self.select_rows(indices, labels, generator)
        return MemoryRows(self.gather("bank", rows), row_labels, rows, stats)

    @property
    def negative_label(self):
        """N + 1: the label of memory negatives (§4)."""
        return self.size + 1

    def _check_shapes(self, indices, *feats):
        """indices as long on the bank's device; feats must be [len(indices), dim] (no host read)."""
        indices = torch.as_tensor(indices, device=self.device).long()
        for f in feats:
            if f.shape != (indices.shape[0], self.dim):
                raise ValueError(f"memory bank: features {tuple(f.shape)} do not match "
                                 f"{indices.shape[0]} indices x dim {self.dim}")
        return indices

    def _write(self, indices, feats, count):
        """Write feats (tuple aligned with self.names) at indices (long, checked); counter += 1 or := 1."""
        for name, f in zip(self.names, feats):
            getattr(self, name)[indices] = f.detach().to(device=self.device, dtype=self.dtype)
        if count == "add":
            self.counter[indices] += 1
        else:
            self.counter[indices] = 1

    def state_dict(self):
        state = {name: getattr(self, name) for name in self.names}
        state["counter"] = self.counter
        return state

    def load_state_dict(self, state):
        for name in self.names + ("counter",):
            if name not in state:
                raise KeyError(f"memory bank state has no {name!r} (keys: {sorted(state)})")
            want = getattr(self, name)
            if tuple(state[name].shape) != tuple(want.shape):
                raise ValueError(f"memory bank state {name!r} has shape {tuple(state[name].shape)}, "
                                 f"this bank needs {tuple(want.shape)}")
            want.copy_(state[name].to(device=want.device, dtype=want.dtype))
