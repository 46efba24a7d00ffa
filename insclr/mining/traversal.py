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


def _scores(sims, thr, fn, query_valid=None):
    """Score of each candidate against the query columns of sims [C, Q] (§8), plus the counts."""
    mask = sims >= thr
    count = mask.sum(dim=1)
    masked = torch.where(mask, sims, 0.0)
    if fn == "avg":
        score = masked.sum(dim=1) / (count + 1e-6)
    elif sims.shape[1] == 0:
        score = torch.zeros(sims.shape[0], dtype=sims.dtype, device=sims.device)
    else:
        score = masked.max(dim=1).values
    return score, count


def select_candidates(mode, member_feats, candidate_feats, init_positive_feats, anchor_positive_feats):
    """The traversal of §8 for one group.

    mode: mode string or TraversalMode; member_feats: [M, D] no-aug features of the group's
    members in row order (row 0 is the anchor's, used alone by 'a+i'); candidate_feats: [C, D]
    bank_noaug rows of the candidates; init_positive_feats: [P, D] of the initial positives
    P_L ('b+i'); anchor_positive_feats: [A, D] of the anchor positives A_L ('a+i').
    Returns LongTensor [S]: the selected positions into candidate_feats, ascending.

    Each iteration scores every candidate against the query set Q (avg or max of the
    similarities >= thr); already-selected candidates score 0 with count 0. 'kNN' takes the
    top min(NN, #count > 0) scores (ties: the lower position first), 'tX' those >= X; their
    features join Q. Only the new query columns are multiplied each iteration.
    """
    mode = parse_mode(mode)
    cand = candidate_feats.float()
    device = cand.device
    if mode.init == "a+i":
        queries = torch.cat([member_feats[:1].float(), anchor_positive_feats.float()])
    elif mode.init == "b+i":
        queries = torch.cat([member_feats.float(), init_positive_feats.float()])
    else:
        queries = member_feats.float()
    selected = torch.zeros(cand.shape[0], dtype=torch.bool, device=device)
    if cand.shape[0] == 0:
        return torch.nonzero(selected).flatten()
    sims = cand @ queries.T                                            # [C, Q], grows by columns
    for (fn, thr), (kind, value) in zip(mode.scores, mode.selects):
        score, count = _scores(sims, thr, fn)
        score = score.masked_fill(selected, 0.0)
        count = count.masked_fill(selected, 0)
        if kind == "k":
            n = min(value, int((count > 0).sum()))
            new = torch.sort(score, descending=True, stable=True).indices[:n]
        else:
            new = torch.nonzero(score >= value).flatten()
        selected[new] = True
        sims = torch.cat([sims, cand @ cand[new].T], dim=1)
    return torch.nonzero(selected).flatten()
