"""Memory bank v1 (ALGORITHM §7): random negatives for the base stages."""

import torch

from insclr.mining.bank import FeatureBank, as_tensor
from insclr.mining.selection import sample_without_replacement


class MemoryBankV1(FeatureBank):
    """Augmented-view features of all N images; `get` draws random negatives.

    neighbors: pool array int [N, k] (numpy or tensor); only its first `potential_positive`
    columns are kept (on `device`). size: N; dim: D; get_size: negatives per step.
    Deviation (§7): the step's own indices are excluded as well as their potential positives;
    exclude_rows=False keeps the original's rule (only the potential positives), for comparisons.
    """

    def __init__(self, neighbors, size, dim, potential_positive, get_size, device="cpu", dtype=None,
                 exclude_rows=True):
        super().__init__(size, dim, ("bank",), device, dtype)
        neighbors = as_tensor(neighbors, "neighbors", "cpu")
        if neighbors.shape[0] != self.size:
            raise ValueError(f"neighbors has {neighbors.shape[0]} rows but the bank size is {self.size}")
        # int32 halves the device memory; gathered rows are widened to int64 when used
        self.potential = neighbors[:, :potential_positive].to(device=self.device, dtype=torch.int32)
        self.get_size = int(get_size)
        self.exclude_rows = bool(exclude_rows)

    def enqueue(self, indices, feats):
        """Write the detached features feats [R, D] of the rows' dataset indices [R]; counter += 1."""
        self._write(indices, (feats,), "add")

    def fill(self, indices, feats):
        """Write feats at indices with counter = 1 (an initial pass over the images)."""
        self._write(indices, (feats,), "set")

    def candidates(self, indices):
        """Indices that may be drawn: counter >= 1, not a potential positive of a row, not a row
        (unless exclude_rows is off).

        indices: long [R] the step's dataset indices (all rows). Returns long [C] ascending.
        """
        indices = torch.as_tensor(indices, device=self.device).long()
        allowed = self.counter >= 1
        allowed[self.potential[indices].flatten().long()] = False
        if self.exclude_rows:
            allowed[indices] = False
        return torch.nonzero(allowed).flatten()

    def select_rows(self, indices, labels=None, generator=None):
        """The dataset indices drawn as negatives (in draw order), their labels and stats; see `get`."""
        pool = self.candidates(indices)
        drawn = sample_without_replacement(pool, min(self.get_size, len(pool)), generator)
        labels = torch.full((len(drawn),), self.negative_label, dtype=torch.long, device=self.device)
        return drawn, labels, {"negatives": len(drawn), "candidates": len(pool)}

    def get(self, indices, labels=None, generator=None):
        """Random negatives for the memory loss (§7).

        indices: long [R] the step's dataset indices; labels: unused (kept for the v2 signature);
        generator: torch.Generator for the draw (seed it identically on every rank).
        Returns (feats [G, D] bank rows in draw order, labels long [G] all N + 1, stats dict).
        feats is a view of a buffer that the next `get` overwrites: run the memory loss's
        backward before the next `get` (autograd raises otherwise).
        """
        rows, labels, stats = self.select_rows(indices, labels, generator)
        self.last_rows = rows                        # the dataset indices behind the returned rows
        return self.gather("bank", rows), labels, stats
