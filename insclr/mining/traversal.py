"""The pseudo-positive traversal of memory bank v2 (ALGORITHM §8) and its mode-string grammar."""

import re
from dataclasses import dataclass

import torch

INIT_MODES = ("a+i", "b+i", "b+0")
_SCORE_RE = re.compile(r"(avg|max)(.{4})")
_SELECT_RE = re.compile(r"k(\d{2})|t(.{4})")


@dataclass(frozen=True)
class TraversalMode:
    """A parsed mode string: init query set, T, and one (score fn, thr) and select rule per iteration."""

    init: str                               # a+i | b+i | b+0
    iterations: int                         # T
    scores: tuple                           # T x ("avg" | "max", threshold float)
    selects: tuple                          # T x ("k", int) | ("t", float)


def _float4(text, what, mode):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"mode {mode!r}: {what} {text!r} is not a 4-character number (e.g. 0.60)") from None


def _entries(part, regex, what, mode):
    """Split a list part (e.g. 'avg0.60max0.70') into regex matches, naming the bad piece."""
    out, pos = [], 0
    while pos < len(part):
        m = regex.match(part, pos)
        if m is None:
            raise ValueError(f"mode {mode!r}: bad {what} entry at {part[pos:]!r} in {part!r}")
        out.append(m)
        pos = m.end()
    if not out:
        raise ValueError(f"mode {mode!r}: empty {what} list")
    return out


def _fit(entries, t, what, mode):
    """Repeat the last entry up to T entries (§8); more entries than T is an error."""
    if len(entries) > t:
        raise ValueError(f"mode {mode!r}: {len(entries)} {what} entries but tr{t} runs only {t} iterations")
    return tuple(entries) + (entries[-1],) * (t - len(entries))


def parse_mode(mode):
    """Parse `INIT_trT_SCORES_SELECTS` (e.g. 'b+i_tr4_avg0.60_k05', 'a+i_tr2_max0.50avg0.60_t0.70k10').

    Returns a TraversalMode; a TraversalMode passes through. Raises ValueError naming the bad part.
    """
    if isinstance(mode, TraversalMode):
        return mode
    parts = str(mode).split("_")
    if len(parts) != 4:
        raise ValueError(f"mode {mode!r}: expected 4 parts INIT_trT_SCORES_SELECTS separated by '_', "
                         f"got {len(parts)}")
    init, tr, scores, selects = parts
    if init not in INIT_MODES:
        raise ValueError(f"mode {mode!r}: init part {init!r} is not one of {', '.join(INIT_MODES)}")
    m = re.fullmatch(r"tr(\d+)", tr)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"mode {mode!r}: iteration part {tr!r} is not trT with an integer T >= 1")
    t = int(m.group(1))
    score_list = [(e.group(1), _float4(e.group(2), "score threshold", mode))
                  for e in _entries(scores, _SCORE_RE, "score", mode)]
    select_list = []
    for e in _entries(selects, _SELECT_RE, "select", mode):
        if e.group(1) is not None:
            select_list.append(("k", int(e.group(1))))
        else:
            select_list.append(("t", _float4(e.group(2), "select threshold", mode)))
    return TraversalMode(init, t, _fit(score_list, t, "score", mode), _fit(select_list, t, "select", mode))


def _scores(sims, valid, thr, fn):
    """Scores [G, C] and counts [G, C] of the candidates against the valid query columns (§8).

    sims: float [G, C, Q]; valid: bool [G, 1, Q] (padding columns are ignored).
    """
    mask = (sims >= thr) & valid
    count = mask.sum(dim=2)
    masked = torch.where(mask, sims, 0.0)
    if fn == "avg":
        return masked.sum(dim=2) / (count + 1e-6), count
    if sims.shape[2] == 0:
        return sims.new_zeros(sims.shape[:2]), count
    # max(sims * mask) over the real columns; padding must not lift a negative maximum to 0
    return masked.masked_fill(~valid, float("-inf")).max(dim=2).values, count


def traverse(mode, candidate_feats, candidate_valid, query_feats, query_valid):
    """The traversal of §8 for G groups at once (rows padded to the largest group).

    candidate_feats: [G, C, D]; candidate_valid: bool [G, C]; query_feats: [G, Q, D] (the
    initial query set of each group); query_valid: bool [G, Q]. Returns bool [G, C]: selected.

    Each iteration scores every candidate against its group's queries (avg or max of the
    similarities >= thr); already-selected candidates score 0 with count 0. 'kNN' takes the
    top min(NN, #count > 0) scores (ties: the lower position first), 'tX' those >= X; their
    features join the group's queries (only these new columns are multiplied).
    """
    mode = parse_mode(mode)
    cand = candidate_feats.float()
    n_groups, n_cand = cand.shape[:2]
    selected = torch.zeros(n_groups, n_cand, dtype=torch.bool, device=cand.device)
    if n_cand == 0:
        return selected
    sims = torch.bmm(cand, query_feats.float().transpose(1, 2))        # [G, C, Q], grows by columns
    valid = query_valid[:, None, :]
    positions = torch.arange(n_cand, device=cand.device)
    for (fn, thr), (kind, value) in zip(mode.scores, mode.selects):
        score, count = _scores(sims, valid, thr, fn)
        score = score.masked_fill(selected, 0.0).masked_fill(~candidate_valid, float("-inf"))
        count = count.masked_fill(selected | ~candidate_valid, 0)
        if kind == "k":
            take = torch.clamp((count > 0).sum(dim=1, keepdim=True), max=value)     # [G, 1]
            order = torch.sort(score, dim=1, descending=True, stable=True).indices
            new = torch.zeros_like(selected).scatter_(1, order, positions[None, :] < take)
        else:
            new = (score >= value) & candidate_valid
        selected |= new
        # the new query columns: each group's newly taken candidates, left-aligned and padded
        n_new = int(new.sum(dim=1).max())
        cols = torch.sort(new.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n_new]
        col_valid = torch.gather(new, 1, cols)
        new_feats = cand[torch.arange(n_groups, device=cand.device)[:, None], cols]      # [G, n_new, D]
        sims = torch.cat([sims, torch.bmm(cand, new_feats.transpose(1, 2))], dim=2)
        valid = torch.cat([valid, col_valid[:, None, :]], dim=2)
    return selected


def query_set(init, member_feats, init_positive_feats, anchor_positive_feats):
    """The initial query set Q of one group for the mode's first part (§8)."""
    if init == "a+i":
        return torch.cat([member_feats[:1].float(), anchor_positive_feats.float()])
    if init == "b+i":
        return torch.cat([member_feats.float(), init_positive_feats.float()])
    return member_feats.float()


def select_candidates(mode, member_feats, candidate_feats, init_positive_feats, anchor_positive_feats):
    """The traversal of §8 for one group.

    mode: mode string or TraversalMode; member_feats: [M, D] no-aug features of the group's
    members in row order (row 0 is the anchor's, used alone by 'a+i'); candidate_feats: [C, D]
    bank_noaug rows of the candidates; init_positive_feats: [P, D] of the initial positives
    P_L ('b+i'); anchor_positive_feats: [A, D] of the anchor positives A_L ('a+i').
    Returns LongTensor [S]: the selected positions into candidate_feats, ascending.
    """
    mode = parse_mode(mode)
    queries = query_set(mode.init, member_feats, init_positive_feats, anchor_positive_feats)
    cand_valid = torch.ones(1, candidate_feats.shape[0], dtype=torch.bool, device=candidate_feats.device)
    query_valid = torch.ones(1, queries.shape[0], dtype=torch.bool, device=queries.device)
    selected = traverse(mode, candidate_feats[None], cand_valid, queries[None], query_valid)
    return torch.nonzero(selected[0]).flatten()
