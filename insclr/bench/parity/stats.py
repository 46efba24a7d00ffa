"""Mean, spread and Welch's t of per-seed figures (the parity table)."""

import math


def mean(values):
    return sum(values) / len(values)


def spread(values):
    """Sample standard deviation (n - 1); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def welch_t(a, b):
    """(t, degrees of freedom) of mean(a) - mean(b) with unequal variances; nan when undefined."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    va, vb = spread(a) ** 2 / len(a), spread(b) ** 2 / len(b)
    if va + vb == 0:
        return (0.0 if mean(a) == mean(b) else math.copysign(math.inf, mean(a) - mean(b))), float("nan")
    t = (mean(a) - mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va and vb else float(
        len(a) + len(b) - 2)
    return t, dof


def table(rows, sets, trainers):
    """Markdown table: one row per seed, then mean, spread and t (first trainer minus second).

    rows: {seed: {trainer: {set: mAP}}}; a missing figure prints as '-'.
    """
    head = ["seed"] + [f"{tr} {s}" for s in sets for tr in trainers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cols = {(tr, s): [] for s in sets for tr in trainers}
    for seed in sorted(rows):
        cells = [str(seed)]
        for s in sets:
            for tr in trainers:
                v = rows[seed].get(tr, {}).get(s)
                cells.append("-" if v is None else f"{v:.2f}")
                if v is not None:
                    cols[(tr, s)].append(v)
        lines.append("| " + " | ".join(cells) + " |")
    for name, fn in (("mean", mean), ("spread", spread)):
        cells = [name] + [f"{fn(cols[(tr, s)]):.2f}" if cols[(tr, s)] else "-" for s in sets for tr in trainers]
        lines.append("| " + " | ".join(cells) + " |")
    if len(trainers) == 2:
        cells = ["t"]
        for s in sets:
            t, _ = welch_t(cols[(trainers[0], s)], cols[(trainers[1], s)])
            cells += [f"{t:.2f}" if math.isfinite(t) else "-", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
