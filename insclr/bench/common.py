"""Shared helpers of the benchmark suites: timing, medians, the table and the JSON report."""

import platform
import statistics
import time

from insclr.io import print_table, write_json  # noqa: F401 (print_table: the suites import it from here)


def parser(description, suite=None):
    """An argparse parser with the options every suite takes (usage names `python -m insclr.bench SUITE`)."""
    from insclr.args import Parser, output_file, positive_int

    p = Parser(prog=f"python -m insclr.bench {suite}" if suite else None, description=description)
    p.add_argument("--json", metavar="PATH", type=output_file,
                   help="write the figures (with the headline 'ratio') to PATH")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions; medians are reported")
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


def report(suite, ratio, figures, json_path=None):
    """Print the headline ratio and, if asked, write {'suite', 'ratio', 'machine', ...figures} as JSON."""
    print(f"\n{suite}: ratio (ours / baseline, higher is better) = {ratio:.3f}")
    out = {"suite": suite, "ratio": ratio, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.update(figures)
    if json_path:
        write_json(json_path, out)
        print(f"wrote {json_path}")
    return out

