"""Straightforward loop implementations of InsCLR's mining and loss, as the original does them.

Per-row / per-group Python loops with set operations on numpy index arrays (np.unique,
np.setdiff1d). The baseline of `python -m insclr.bench train` (so it ships in the package: the
benchmark runs from an installed wheel) and the reference tests/ check the vectorised code in
insclr.loss / insclr.mining against. They follow the same tie rules
(docs/algorithm.md): a claimed index keeps the first group in row order, kNN ties go to the
lower candidate position, rows are returned positives (ascending index), initial negatives
(ascending), sampled others (draw order), and the fill draw is insclr.mining's
sample_without_replacement on the ascending pool.
"""

import numpy as np
import torch

from insclr.mining import sample_without_replacement


def loss_loop(x, x_labels, ref, ref_labels, margin, pos_margin=0.0, memory=False):
    """ALGORITHM §6 with one loop iteration per row of x (the original's ContrastiveLoss)."""
    if memory:
        keep = x_labels > 0
        x, x_labels = x[keep], x_labels[keep]
    sims = x.float() @ ref.float().T
    losses, n_pos, n_neg = [], 0, 0
    for i in range(x.shape[0]):
        same = ref_labels == x_labels[i]
        pos = sims[i][same]
        pos = pos[pos < 1 - 1e-6 - pos_margin]
        neg = sims[i][~same]
        neg = neg[neg > margin]
        n_pos, n_neg = n_pos + len(pos), n_neg + len(neg)
        losses.append((1 - pos).sum() + neg.sum())
    n = max(x.shape[0], 1)
    return sum(losses) / n, {"pos_per_row": n_pos / n, "neg_per_row": n_neg / n}


def select_positives_loop(anchor_noaug, neighbor_noaug, labels, mode, thresh, always_true=0):
    """ALGORITHM §5 anchor by anchor, neighbour by neighbour."""
    b = anchor_noaug.shape[0]
    k = neighbor_noaug.shape[0] // b
    out = labels.clone()
    if mode == "none":
        return out
    for a in range(b):
        s = [float(anchor_noaug[a].float() @ neighbor_noaug[a * k + j].float()) for j in range(k)]
        top = max(s)
        for j in range(k):
            score = s[j] if mode == "fixed" else torch.tensor(s[j]) / torch.tensor(top)
            if j >= always_true and not score >= thresh:
                out[b + a * k + j] = -labels[a]
    return out


def boundaries_loop(similarities, thresh):
    """The original's boundary set-up: a Python loop over every entry >= thresh (last column + 1)."""
    similarities = np.asarray(similarities, dtype=np.float32)
    bound = -np.ones(len(similarities), dtype=np.int64)
    rows, cols = np.nonzero(similarities >= thresh)
    for i, j in zip(rows, cols):
        bound[i] = max(bound[i], j)
    return bound + 1


def parse_mode_loop(mode):
    """The original's character-slicing parser: (init, T, [(fn, thr)] * T, [(kind, value)] * T)."""
    init, tr, scores, selects = mode.split("_")
    t = int(tr[2:])
    score_list = []
    while scores:
        score_list.append((scores[:3], float(scores[3:7])))
        scores = scores[7:]
    select_list = []
    while selects:
        if selects[0] == "k":
            select_list.append(("k", int(selects[1:3])))
            selects = selects[3:]
        else:
            select_list.append(("t", float(selects[1:5])))
            selects = selects[5:]
    score_list += [score_list[-1]] * (t - len(score_list))
    select_list += [select_list[-1]] * (t - len(select_list))
    return init, t, score_list, select_list


def select_candidates_loop(mode, member_feats, candidate_feats, init_positive_feats, anchor_positive_feats):
    """The traversal of §8 as the original writes it: the whole query set is re-multiplied each time."""
    init, t, score_list, select_list = parse_mode_loop(mode)
    if init == "a+i":
        queries = torch.cat([member_feats[:1], anchor_positive_feats]).float()
    elif init == "b+i":
        queries = torch.cat([member_feats, init_positive_feats]).float()
    else:
        queries = member_feats.float()
    cand = candidate_feats.float()
    selected = torch.zeros(len(cand), dtype=torch.bool)
    for i in range(t):
        sims = cand @ queries.T
        mask = (sims >= score_list[i][1]).float()
        num = mask.sum(dim=1)
        if score_list[i][0] == "avg":
            score = (sims * mask).sum(dim=1) / (num + 1e-6)
        else:
            score = (sims * mask).max(dim=1).values if len(cand) else torch.zeros(0)
        score[selected] = 0.0
        num[selected] = 0
        if select_list[i][0] == "k":
            k = min(select_list[i][1], int((num > 0).sum()))
            new = torch.sort(score, descending=True, stable=True).indices[:k]
        else:
            new = torch.nonzero(score >= select_list[i][1]).flatten()
        queries = torch.cat([queries, cand[new]])
        selected[new] = True
    return torch.nonzero(selected).flatten()


def _first_claim(values_per_group, labels_in_order):
    """Concatenate per-group index arrays (group order); an index keeps its first group's label."""
    values = np.concatenate([v for v in values_per_group] + [np.zeros(0, np.int64)])
    labels = np.concatenate([np.full(len(v), lab) for v, lab in zip(values_per_group, labels_in_order)]
                            + [np.zeros(0, np.int64)])
    uniq, first = np.unique(values, return_index=True)
    return uniq.astype(np.int64), labels[first].astype(np.int64)


class ReferenceBankV2:
    """Memory bank v2 of §8 written group by group with numpy set operations (the original's way).

    `from_bank` takes a MemoryBankV2's tables (shared on the CPU, copied once from a GPU: the
    original keeps its bank in host memory); pb/nb are passed in (boundaries_loop computes them
    the original way).
    """

    def __init__(self, neighbors, pos_bound, neg_bound, bank, bank_noaug, counter, mode, get_size,
                 use_negative=True):
        self.neighbors = np.asarray(neighbors).astype(np.int64)
        self.pb, self.nb = np.asarray(pos_bound), np.asarray(neg_bound)
        self.bank, self.bank_noaug, self.counter = bank, bank_noaug, counter
        self.mode, self.get_size, self.use_negative = mode, get_size, use_negative
        self.size = len(self.neighbors)

    @classmethod
    def from_bank(cls, bank, pos_bound=None, neg_bound=None):
        return cls(bank.neighbors.cpu().numpy(),
                   bank.pos_bound.cpu().numpy() if pos_bound is None else pos_bound,
                   bank.neg_bound.cpu().numpy() if neg_bound is None else neg_bound,
                   bank.bank.cpu(), bank.bank_noaug.cpu(), bank.counter.cpu(),
                   _mode_string(bank.mode), bank.get_size, bank.use_negative)

    def get(self, indices, labels, generator=None):
        rows, row_labels, stats = self.select_rows(indices, labels, generator)
        self.last_rows = rows
        return self.bank.cpu()[rows], row_labels, stats

    def select_rows(self, indices, labels, generator=None):
        idx_all = indices.cpu().numpy()
        lab_all = labels.cpu().numpy()
        keep = lab_all > 0
        idx, lab = idx_all[keep], lab_all[keep]
        group_labels = []
        for value in lab.tolist():
            if value not in group_labels:
                group_labels.append(value)
        members = [idx[lab == g] for g in group_labels]
        nbr, pb, nb = self.neighbors, self.pb, self.nb
        init_pos, anchor_pos = [], []
        for m in members:
            p = np.unique(np.concatenate([nbr[i, :pb[i]] for i in m]))
            init_pos.append(np.setdiff1d(p, m))
            anchor_pos.append(nbr[m[0], :pb[m[0]]])
        pos_v, pos_l = _first_claim(init_pos, group_labels)
        ap_v, ap_l = _first_claim(anchor_pos, group_labels)
        counter = self.counter.cpu().numpy()
        negs = [nbr[i, nb[i]:] for i in idx]
        negs = [n[counter[n] >= 1] for n in negs]
        init_neg = np.setdiff1d(np.unique(np.concatenate(negs + [np.zeros(0, np.int64)])), pos_v)
        noaug = self.bank_noaug.cpu()
        selected = []
        for g, m in zip(group_labels, members):
            cand = np.unique(np.concatenate([nbr[i, pb[i]:nb[i]] for i in m]))
            cand = np.setdiff1d(cand, pos_v)
            if len(cand) == 0:
                selected.append(cand)
                continue
            t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
            chosen = select_candidates_loop(self.mode, noaug[t(m)], noaug[t(cand)],
                                            noaug[t(pos_v[pos_l == g])], noaug[t(ap_v[ap_l == g])])
            selected.append(cand[chosen.numpy()])
        sel_v, sel_l = _first_claim(selected, group_labels)
        pseudo = np.concatenate([pos_v, sel_v])
        pseudo_l = np.concatenate([pos_l, sel_l])
        order = np.argsort(pseudo, kind="stable")
        pseudo, pseudo_l = pseudo[order], pseudo_l[order]
        init_neg = np.setdiff1d(init_neg, pseudo)
        rows, row_labels = [pseudo], [pseudo_l]
        if self.use_negative:
            others = np.nonzero(counter >= 1)[0]
            others = np.setdiff1d(others, pseudo)
            others = np.setdiff1d(others, init_neg)
            n_fill = max(min(self.get_size - len(pseudo) - len(init_neg), len(others)), 0)
            drawn = sample_without_replacement(torch.from_numpy(others), n_fill, generator).numpy()
            negatives = np.concatenate([init_neg, drawn])
            rows.append(negatives)
            row_labels.append(np.full(len(negatives), self.size + 1))
        rows = torch.from_numpy(np.concatenate(rows).astype(np.int64))
        row_labels = torch.from_numpy(np.concatenate(row_labels).astype(np.int64))
        stats = {"positives": len(pseudo), "init_positives": len(pos_v), "selected": len(sel_v),
                 "init_negatives": len(init_neg)}
        return rows, row_labels, stats


def _mode_string(mode):
    """TraversalMode -> a mode string with all T entries spelled out (the reference parses it)."""
    scores = "".join(f"{fn}{thr:.2f}" for fn, thr in mode.scores)
    selects = "".join(f"k{v:02d}" if kind == "k" else f"t{v:.2f}" for kind, v in mode.selects)
    return f"{mode.init}_tr{mode.iterations}_{scores}_{selects}"


def v1_get_loop(bank, indices, generator=None):
    """Memory bank v1 `get` (§7 with the own-index deviation) with numpy set operations."""
    counter = bank.counter.cpu().numpy()
    candidates = np.nonzero(counter >= 1)[0]
    potential = np.unique(bank.potential.cpu().numpy()[indices.cpu().numpy()])
    candidates = np.setdiff1d(candidates, potential)
    candidates = np.setdiff1d(candidates, indices.cpu().numpy())
    drawn = sample_without_replacement(torch.from_numpy(candidates), min(bank.get_size, len(candidates)),
                                       generator)
    return drawn
