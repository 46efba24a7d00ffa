"""Memory bank v2 (ALGORITHM §8): pseudo-positive mining for the impr stage, on whole tensors.

Set operations of the original (unions, differences, de-duplication over index arrays) become
boolean masks of size N, scatters and sorts; the traversal runs for all groups of the step at
once, padded to the largest group (a few batched matrix products per iteration).

Tie rules (docs/algorithm.md): an index claimed by several groups keeps the label of the group
that comes first in row order; candidates of a group are in ascending index order; the
returned rows are the pseudo-positives in ascending index order, then the initial negatives in
ascending index order, then the sampled others in draw order.
"""

import torch

from insclr.mining.bank import FeatureBank, as_tensor
from insclr.mining.selection import boundaries, sample_without_replacement
from insclr.mining.traversal import parse_mode, traverse


def claim(values, groups, n_groups):
    """One group per value: the lowest group id (= first in row order) wins.

    values, groups: long [E]. Returns (values long [U] ascending, groups long [U]).
    """
    key = torch.unique(values * n_groups + groups)                    # sorted: by value, then group
    v, g = key // n_groups, key % n_groups
    first = torch.ones_like(v, dtype=torch.bool)
    first[1:] = v[1:] != v[:-1]
    return v[first], g[first]


def pad_groups(values, groups, n_groups):
    """values long [E] with groups long [E] -> (padded long [G, M], valid bool [G, M]).

    Each group's values keep their order and are left-aligned; padding holds 0 (a valid row
    index, masked by `valid`).
    """
    order = torch.sort(groups, stable=True).indices
    values, groups = values[order], groups[order]
    counts = torch.bincount(groups, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(values), device=values.device) - starts[groups]
    width = int(counts.max()) if len(values) else 0
    padded = torch.zeros(n_groups, width, dtype=torch.long, device=values.device)
    valid = torch.zeros(n_groups, width, dtype=torch.bool, device=values.device)
    padded[groups, slot] = values
    valid[groups, slot] = True
    return padded, valid


class MemoryBankV2(FeatureBank):
    """Augmented (`bank`) and no-aug (`bank_noaug`) features of all N images (§8).

    pool: the CandidatePool (neighbors int32 [N, k], similarities float16 [N, k]; on the CPU the
    bank indexes the pool's arrays in place, on a GPU it copies the neighbours there once);
    dim: D; positive_thresh / negative_thresh: pool similarity boundaries (pb, nb); mode:
    traversal mode string (§8 grammar); get_size: rows per step; use_negative: return negatives
    (label N + 1) as well as pseudo-positives. Needs the initial pass (`fill`) over all images.
    """

    needs_fill = True

    def __init__(self, pool, dim, positive_thresh, negative_thresh, mode, get_size, use_negative=True,
                 device="cpu", dtype=None):
        super().__init__(pool.num_samples, dim, ("bank", "bank_noaug"), device, dtype)
        self.mode = parse_mode(mode)
        if positive_thresh < negative_thresh:
            raise ValueError(f"memory bank v2: positive_thresh {positive_thresh} is below "
                             f"negative_thresh {negative_thresh}")
        self.neighbors = as_tensor(pool.neighbors, "neighbors", self.device)
        similarities = as_tensor(pool.similarities, "similarities", "cpu")
        self.pos_bound = boundaries(similarities, positive_thresh).to(self.device)
        self.neg_bound = boundaries(similarities, negative_thresh).to(self.device)
        self.get_size, self.use_negative = int(get_size), bool(use_negative)

    def _tables(self, views):
        if views.noaug is None:
            raise ValueError("memory.version=v2 stores the no-aug view as well: set noaug.enabled=true")
        return views.aug, views.noaug

    def _entries(self, rows, lo, hi):
        """neighbors[rows[r], lo[r]:hi[r]] for every r: (values long [E], r long [E])."""
        cols = torch.arange(self.neighbors.shape[1], device=self.device)
        r, c = torch.nonzero((cols >= lo[:, None]) & (cols < hi[:, None]), as_tuple=True)
        return self.neighbors[rows[r], c].long(), r

    def _groups(self, idx, lab):
        """Group kept rows by label, groups numbered in row order of their first member.

        Returns (group long [R] per row, group_label long [G], anchor long [G] dataset index).
        """
        uniq, inv = torch.unique(lab, return_inverse=True)
        rows = torch.arange(len(lab), device=self.device)
        first = torch.full((len(uniq),), len(lab), dtype=torch.long, device=self.device)
        first.scatter_reduce_(0, inv, rows, "amin")
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=self.device)
        return rank[inv], uniq[order], idx[first[order]]

    def _initial_positives(self, idx, group, anchor, n_groups):
        """P_L = (U_i neighbors[i, :pb_i]) minus I_L, and A_L = neighbors[anchor, :pb_anchor]; claimed."""
        n = self.size
        v, r = self._entries(idx, torch.zeros_like(idx), self.pos_bound[idx])
        g = group[r]
        own = torch.isin(g * n + v, group * n + idx)
        pos_v, pos_g = claim(v[~own], g[~own], n_groups)
        av, ag = self._entries(anchor, torch.zeros_like(anchor), self.pos_bound[anchor])
        ap_v, ap_g = claim(av, ag, n_groups)
        return pos_v, pos_g, ap_v, ap_g

    def _candidates(self, idx, group, is_pos, n_groups):
        """C_L = (U_i neighbors[i, pb_i:nb_i]) minus all initial positives; per group ascending."""
        n = self.size
        v, r = self._entries(idx, self.pos_bound[idx], self.neg_bound[idx])
        g = group[r]
        keep = ~is_pos[v]
        key = torch.unique(g[keep] * n + v[keep])                      # sorted by group, then index
        return key % n, key // n

    def mine(self, indices, labels):
        """Pseudo-positives and initial negatives of §8 steps 1-5.

        indices, labels: long [R] the step's rows (all-gathered, row order).
        Returns (pos_label long [N]: label of each pseudo-positive, 0 elsewhere;
        negative bool [N]: initial negatives; stats dict).
        """
        indices = torch.as_tensor(indices, device=self.device).long()
        labels = torch.as_tensor(labels, device=self.device).long()
        keep = labels > 0
        idx, lab = indices[keep], labels[keep]
        group, group_label, anchor = self._groups(idx, lab)
        n_groups = len(group_label)
        pos_v, pos_g, ap_v, ap_g = self._initial_positives(idx, group, anchor, n_groups)
        is_pos = torch.zeros(self.size, dtype=torch.bool, device=self.device)
        is_pos[pos_v] = True

        negative = torch.zeros(self.size, dtype=torch.bool, device=self.device)
        nv, _ = self._entries(idx, self.neg_bound[idx], torch.full_like(idx, self.neighbors.shape[1]))
        negative[nv] = True
        negative &= (self.counter >= 1) & ~is_pos

        cand_v, cand_g = self._candidates(idx, group, is_pos, n_groups)
        sel_v, sel_g = self._traverse(idx, group, anchor, n_groups, pos_v, pos_g, ap_v, ap_g, cand_v, cand_g)
        sel_v, sel_g = claim(sel_v, sel_g, n_groups)

        pos_label = torch.zeros(self.size, dtype=torch.long, device=self.device)
        pos_label[pos_v] = group_label[pos_g]
        pos_label[sel_v] = group_label[sel_g]
        negative &= pos_label == 0
        stats = {"groups": n_groups, "init_positives": len(pos_v), "candidates": len(cand_v),
                 "selected": len(sel_v)}
        return pos_label, negative, stats

    def _traverse(self, idx, group, anchor, n_groups, pos_v, pos_g, ap_v, ap_g, cand_v, cand_g):
        """The traversal for all groups in one padded batch; returns the (index, group) pairs selected."""
        if n_groups == 0 or len(cand_v) == 0:
            return cand_v[:0], cand_g[:0]
        init = self.mode.init
        if init == "a+i":
            q_v = torch.cat([anchor, ap_v])
            q_g = torch.cat([torch.arange(n_groups, device=self.device), ap_g])
        elif init == "b+i":
            q_v, q_g = torch.cat([idx, pos_v]), torch.cat([group, pos_g])
        else:
            q_v, q_g = idx, group
        queries, query_valid = pad_groups(q_v, q_g, n_groups)
        cands, cand_valid = pad_groups(cand_v, cand_g, n_groups)
        selected = traverse(self.mode, self.bank_noaug[cands], cand_valid, self.bank_noaug[queries], query_valid)
        g, pos = torch.nonzero(selected, as_tuple=True)
        return cands[g, pos], g

    def select_rows(self, indices, labels, generator=None):
        """The dataset indices and labels of the memory rows (§8 steps 1-7), without gathering features.

        Returns (rows long [G], labels long [G], stats dict): the pseudo-positives (their group's
        label), then the negatives (N + 1); `get` gathers their features.
        """
        pos_label, negative, stats = self.mine(indices, labels)
        positives = torch.nonzero(pos_label).flatten()
        init_neg = torch.nonzero(negative).flatten()
        rows, row_labels = [positives], [pos_label[positives]]
        sampled = 0
        if self.use_negative:
            others = torch.nonzero((self.counter >= 1) & (pos_label == 0) & ~negative).flatten()
            n_fill = max(min(self.get_size - len(positives) - len(init_neg), len(others)), 0)
            drawn = sample_without_replacement(others, n_fill, generator)
            negatives = torch.cat([init_neg, drawn])
            rows.append(negatives)
            row_labels.append(torch.full_like(negatives, self.negative_label))
            sampled = len(drawn)
        rows, row_labels = torch.cat(rows), torch.cat(row_labels)
        stats.update(positives=len(positives), init_negatives=len(init_neg), sampled=sampled,
                     negatives=len(rows) - len(positives), size=len(rows))
        return rows, row_labels, stats
