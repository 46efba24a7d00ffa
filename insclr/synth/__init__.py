"""Synthetic datasets in the real on-disk layouts: `python -m insclr.synth --root DIR [--seed S] [--scale tiny|small]`.

`generate(root, seed=0, scale="tiny", datasets=None, workers=None) -> dict` writes, under root,
gldv2/, roxford5k/, rparis6k/, instre/ and revisitop1m/ exactly as the real datasets ship them
(docs/datasets.md) and returns, per dataset, its counts. The same seed gives the same bytes,
whatever the number of worker processes.
"""

import argparse
import os
import sys
import time
from pathlib import Path

DATASETS = ("gldv2", "roxford5k", "rparis6k", "instre", "revisitop1m")
VERSION = 1

# Sizes. tiny: a few seconds (tests); small: a few thousand images (the demo).
SCALES = {
    "tiny": {
        "sides": (300, 480),
        "gldv2": dict(big_landmarks=7, big=(15, 18), few_landmarks=13, few=(2, 5), dup_rate=0.0, clutter=12,
                      index_landmarks=10, index_per=4, test_queries=6, test_ignored=4),
        "revisitop": dict(landmarks=5, queries_per_landmark=1, easy=3, hard=1, junk=1, distractors=15,
                          distractor_instances=8, clutter=8),
        "instre": dict(pairs=1, s2_classes=2, per_class=9, queries_per_class=1, clutter=8),
        "revisitop1m": dict(images=20, instances=12, clutter=8),
    },
    "small": {
        "sides": (300, 640),
        # Train photographs all show their landmark large (the "landmark" preset: little clutter, mild
        # light changes), so that random-init stage-0 features give a usable kNN pool (neighbour
        # precision@1 ~0.6 instead of ~0.12 with the tiny mix); the evaluation sets stay hard.
        "gldv2": dict(big_landmarks=92, big=(15, 32), few_landmarks=30, few=(2, 14), dup_rate=0.015, clutter=40,
                      index_landmarks=60, index_per=5, test_queries=60, test_ignored=40,
                      train_mix={"landmark": 1.0}),
        "revisitop": dict(landmarks=10, queries_per_landmark=2, easy=10, hard=7, junk=3, distractors=200,
                          distractor_instances=60, clutter=30),
        "instre": dict(pairs=4, s2_classes=8, per_class=14, queries_per_class=2, clutter=20),
        "revisitop1m": dict(images=300, instances=150, clutter=30),
    },
}


def _render_one(args):
    """Photograph one job and write it (pool worker): returns ((width, height), boxes)."""
    from insclr.synth.render import render_view

    root, seed, path, spec = args
    data, size, boxes = render_view(seed, spec)
    path = Path(root) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a killed run never leaves a truncated image under the final name
    return size, boxes


class _Renderer:
    """Renders job lists serially or with a process pool, with one progress bar over all datasets."""

    def __init__(self, root, seed, workers, bar):
        self.root, self.seed, self.workers, self.bar = str(root), seed, workers, bar
        self.pool = None
        if workers > 1:
            import multiprocessing

            # spawn: no state (threads, locks) inherited from the caller, e.g. a torch-importing test
            self.pool = multiprocessing.get_context("spawn").Pool(workers)

    def __call__(self, jobs):
        args = [(self.root, self.seed, path, spec) for path, spec in jobs]
        it = self.pool.imap(_render_one, args, chunksize=8) if self.pool else map(_render_one, args)
        results = []
        for r in it:
            results.append(r)
            self.bar.update(1)
        return results

    def close(self):
        if self.pool:
            self.pool.close()
            self.pool.join()


def _check_args(scale, datasets):
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: expected one of {', '.join(SCALES)}")
    datasets = list(DATASETS if datasets is None else datasets)
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(map(repr, unknown))}: expected some of {', '.join(DATASETS)}")
    return datasets


def generate(root, seed=0, scale="tiny", datasets=None, workers=None):
    """Write the synthetic datasets under `root`; returns {dataset: {count name: count}}.

    datasets: subset of DATASETS (default all). workers: processes (default 1 for tiny, all CPUs
    for small); the output does not depend on it. Also writes root/synth.json (seed, scale, counts).
    """
    from insclr.io import progress, write_json
    from insclr.synth.layouts import WRITERS

    datasets = _check_args(scale, datasets)
    if workers is None:
        workers = 1 if scale == "tiny" else (os.cpu_count() or 1)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = SCALES[scale]
    start = time.perf_counter()
    summary = {}
    with progress(desc=f"synth {scale}", unit="img") as bar:
        render = _Renderer(root, int(seed), int(workers), bar)
        try:
            for name in datasets:
                summary[name] = WRITERS[name](root, int(seed), cfg, render)
        finally:
            render.close()
    seconds = time.perf_counter() - start
    write_json(root / "synth.json", {"generator": "insclr.synth", "version": VERSION, "seed": int(seed),
                                     "scale": scale, "seconds": round(seconds, 2), "datasets": summary})
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m insclr.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="output folder (one sub-folder per dataset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated subset of " + ",".join(DATASETS))
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 1 for tiny, all CPUs for small)")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    try:
        _check_args(args.scale, datasets)
    except ValueError as e:
        parser.error(str(e))
    start = time.perf_counter()
    summary = generate(args.root, seed=args.seed, scale=args.scale, datasets=datasets, workers=args.workers)
    for name, counts in summary.items():
        print(f"{name:12s} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"wrote {args.root} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
