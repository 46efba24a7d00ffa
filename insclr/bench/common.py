"""Shared helpers of the benchmark suites: timing, medians, the table and the JSON report."""

import argparse
import platform
import statistics
import time

from insclr.io import write_json


def parser(description, suite=None):
    """An argparse parser with the options every suite takes (usage names `python -m insclr.bench SUITE`)."""
    p = argparse.ArgumentParser(prog=f"python -m insclr.bench {suite}" if suite else None, description=description)
    p.add_argument("--json", metavar="PATH", help="write the figures (with the headline 'ratio') to PATH")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; medians are reported")
    return p


def timed(fn, repeats=3, warmup=1, sync=None):
    """Run `fn` warmup + repeats times; return the list of wall times of the timed runs (seconds)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def median(values):
    return statistics.median(values)


def machine():
    """A short description of where the figures were measured."""
    import os

    desc = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        desc["torch"] = torch.__version__
        if torch.cuda.is_available():
            desc["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return desc


def print_table(rows, columns, title=None):
    """Print `rows` (list of dicts) as an aligned text table with the given column order."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def report(suite, ratio, figures, json_path=None):
    """Print the headline ratio and, if asked, write {'suite', 'ratio', 'machine', ...figures} as JSON."""
    print(f"\n{suite}: ratio (ours / baseline, higher is better) = {ratio:.3f}")
    out = {"suite": suite, "ratio": ratio, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.update(figures)
    if json_path:
        write_json(json_path, out)
        print(f"wrote {json_path}")
    return out

