"""Shared helpers of the benchmark suites: timing, medians, the table and the JSON report."""

import platform
import statistics
import threading
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



class PeakSampler:
    """Context manager: the element-wise peak of `read()` (a tuple of numbers, e.g. resident bytes)
    while inside, read by a thread every `interval` seconds and once more on exit; `.start` is the
    reading on entry (the peak is never below it)."""

    def __init__(self, read, interval):
        self.read, self.interval = read, interval

    def _sample(self):
        self.peak = tuple(map(max, self.peak, self.read()))

    def _watch(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self.start = self.peak = tuple(self.read())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="insclr-bench-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
