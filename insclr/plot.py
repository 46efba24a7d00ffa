"""Figures drawn with matplotlib (Agg, no display needed): training curves and precision–recall.

`training_plot(records, maps, path)`: one panel per quantity training logs (loss terms,
positives and negatives per row, selected pseudo-positives, learning rate, images/s) plus mAP at
each evaluation step, every panel with labelled axes and ticks. `pr_plot(curves, path)`: the
mean precision–recall curve of each evaluation set.
"""

import math

import numpy as np

# (panel title, y label, {series label: metrics key}); a panel without data is left out
TRAINING_PANELS = (
    ("loss (moving average)", "loss", {"total": "loss", "batch": "batch_loss", "memory": "memory_loss"}),
    ("positives and negatives per row", "pairs per row",
     {"batch positives": "batch_pos_per_row", "batch negatives": "batch_neg_per_row",
      "memory positives": "memory_pos_per_row", "memory negatives": "memory_neg_per_row"}),
    ("selected pseudo-positives", "selected", {"selected": "selected"}),
    ("learning rate", "learning rate", {"lr": "lr"}),
    ("throughput", "images / s", {"images/s": "images_per_s"}),
)
SMOOTHED = {"loss", "batch_loss", "memory_loss", "batch_pos_per_row", "batch_neg_per_row",
            "memory_pos_per_row", "memory_neg_per_row", "images_per_s"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def smooth(values, window=20):
    """Trailing moving average over `window` values (noisy per-step losses)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (csum[1:] - csum[lo]) / (np.arange(1, len(values) + 1) - lo)


def series(records, key):
    """(steps, values) of `key` in metric records (dicts with 'step'), finite values only."""
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
    return np.array([p[0] for p in pts], dtype=np.float64), np.array([p[1] for p in pts], dtype=np.float64)


def training_plot(records, maps, path, window=20):
    """Write the training curves PNG to `path`; returns the list of panel titles drawn.

    records: metric records (metrics.jsonl lines) with a global 'step'; maps: {label: [(step,
    mAP %)]} from the evaluations."""
    plt = _pyplot()
    panels = []
    for title, ylabel, keys in TRAINING_PANELS:
        lines = {label: series(records, key) for label, key in keys.items()}
        lines = {label: (x, smooth(y, window) if key in SMOOTHED else y)
                 for (label, (x, y)), key in zip(lines.items(), keys.values()) if len(x)}
        if lines:
            panels.append((title, ylabel, lines, "step"))
    map_lines = {label: (np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float))
                 for label, pts in maps.items() if pts}
    panels.append(("mAP at each evaluation", "mAP %", map_lines, "training step"))
    cols = 2
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, ylabel, lines, xlabel) in zip(axes.flat, panels):
        for label, (x, y) in lines.items():
            ax.plot(x, y, marker="o" if len(x) <= 20 else None, markersize=4, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ylabel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [p[0] for p in panels]


def pr_plot(curves, path):
    """curves: {label: (recall [R], precision [R])} -> PNG at `path` with one line per set."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("mean precision–recall per evaluation set")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


RECALL_LEVELS = np.linspace(0, 1, 101)


def mean_pr_curve(ranked_labels, positives_per_query, levels=RECALL_LEVELS):
    """Mean interpolated precision at recall `levels` over queries.

    ranked_labels: per query a bool array over its ranked list (True: positive; junk already
    removed); positives_per_query: the number of positives of each query (recall's
    denominator; positives beyond the list count as never found). Queries without positives
    are left out. Interpolated precision at r: the best precision at any recall ≥ r (0 when
    recall r is never reached). -> (levels [R], precision [R])."""
    curves = []
    for hits, n_pos in zip(ranked_labels, positives_per_query):
        if n_pos <= 0:
            continue
        hits = np.asarray(hits, dtype=bool)
        found = np.cumsum(hits)
        precision = found / np.arange(1, len(hits) + 1)
        recall = found / n_pos
        # best precision at recall >= r: a running max from the end
        best = np.maximum.accumulate(precision[::-1])[::-1] if len(hits) else np.zeros(0)
        idx = np.searchsorted(recall, levels, side="left")
        curves.append(np.where(idx < len(hits), best[np.minimum(idx, max(len(hits) - 1, 0))], 0.0))
    if not curves:
        return levels, np.zeros_like(levels)
    return levels, np.mean(curves, axis=0)


def eval_maps(records):
    """{'<set> M': [(step, mAP %)]} from the 'eval/<set>/<metric>' entries training logs (mapM,
    mapH of revisitop sets; map of INSTRE; map100_public of GLDv2)."""
    names = {"mapM": "Medium", "mapH": "Hard", "map": "mAP", "map100_public": "mAP@100 public"}
    maps = {}
    for r in records:
        for key, value in r.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in names:
                maps.setdefault(f"{parts[1]} {names[parts[2]]}", []).append((r["step"], 100 * value))
    return maps


def main(argv=None):
    import json
    import sys
    from pathlib import Path

    from insclr.args import Parser, output_file

    p = Parser(prog="python -m insclr.plot", description="Training curves of a run (its metrics.jsonl) as a PNG.")
    p.add_argument("metrics", help="metrics.jsonl of a training run, or the run folder holding it")
    p.add_argument("--out", type=output_file, default=None, 
                   help="PNG to write (default: training_curves.png beside it)")
    args = p.parse_args(argv)
    path = Path(args.metrics)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        print(f"error: {path}: no such metrics file", file=sys.stderr)
        return 2
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(path.read_text().splitlines()):  # only the last line may be cut by a crash
                print(f"error: {path}:{n}: not a JSON record", file=sys.stderr)
                return 2
    out = args.out or path.with_name("training_curves.png")
    panels = training_plot([r for r in records if "loss" in r], eval_maps(records), out)
    print(f"wrote {out} ({', '.join(panels)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
