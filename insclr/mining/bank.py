"""Storage shared by the memory banks: feature rows on the training device, update counters."""

import numpy as np
import torch


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
    same all-gathered batches holds the same bank.
    """

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

    @property
    def negative_label(self):
        """N + 1: the label of memory negatives (§4)."""
        return self.size + 1

    def _check_rows(self, indices, *feats):
        indices = torch.as_tensor(indices, device=self.device).long()
        for f in feats:
            if f.shape != (indices.shape[0], self.dim):
                raise ValueError(f"memory bank: features {tuple(f.shape)} do not match "
                                 f"{indices.shape[0]} indices x dim {self.dim}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.size):
            raise ValueError(f"memory bank: indices must lie in [0, {self.size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices

    def _write(self, indices, feats, count):
        """Write feats (tuple aligned with self.names) at indices; counter += 1 or := 1."""
        indices = self._check_rows(indices, *feats)
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
