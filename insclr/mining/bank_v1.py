"""Memory bank v1 (ALGORITHM §7): random negatives for the base stages."""

import torch

from insclr.mining.bank import FeatureBank, as_tensor
from insclr.mining.selection import sample_without_replacement


class MemoryBankV1(FeatureBank):
    """Augmented-view features of all N images; `get` draws random negatives.

    pool: the CandidatePool (neighbors int32 [N, k]); only its first `potential_positive`
    columns are used (on `device`; on the CPU a view of the pool, no copy). dim: D; get_size:
    negatives per step. Deviation (§7): the step's own indices are excluded as well as their
    potential positives; exclude_rows=False keeps the original's rule (only the potential
    positives), for comparisons.
    """

    def __init__(self, pool, dim, potential_positive, get_size, device="cpu", dtype=None, exclude_rows=True):
        super().__init__(pool.num_samples, dim, ("bank",), device, dtype)
        neighbors = as_tensor(pool.neighbors, "neighbors", "cpu")
        # int32 halves the device memory; gathered rows are widened to int64 when used
        self.potential = neighbors[:, :potential_positive].to(device=self.device, dtype=torch.int32)
        self.get_size = int(get_size)
        self.exclude_rows = bool(exclude_rows)

    def _tables(self, views):
        return (views.aug,)

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
        """Random negatives (§7): the drawn dataset indices in draw order, labels all N + 1, stats.

        labels: unused (v1 mines no positives).
        """
        pool = self.candidates(indices)
        drawn = sample_without_replacement(pool, min(self.get_size, len(pool)), generator)
        labels = torch.full((len(drawn),), self.negative_label, dtype=torch.long, device=self.device)
        return drawn, labels, {"negatives": len(drawn), "candidates": len(pool)}
