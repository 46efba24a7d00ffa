"""Benchmarks: `python -m insclr.bench SUITE [options] [--json PATH]`.

Each suite measures our code and a baseline in the same run on the same machine and prints
a table; with --json it writes its figures with the headline ratio (ours / baseline, higher
is better) under the top-level key `ratio`.
"""

SUITES = {
    "shard": "insclr.bench.shard",
    "loader": "insclr.bench.loader",
    "extract": "insclr.bench.extract",
    "pool": "insclr.bench.pool",
    "pool-memory": "insclr.bench.pool_memory",
    "train": "insclr.bench.train",
    "evaluate": "insclr.bench.evaluate",
    "fidelity": "insclr.bench.fidelity",
    "rerank": "insclr.bench.rerank",
    "parity": "insclr.bench.parity",
    "search": "insclr.bench.search",
    "loop": "insclr.bench.loop",
}


def main(argv=None):
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown benchmark suite {argv[0]!r}", file=sys.stderr)
        print("usage: python -m insclr.bench {" + ",".join(SUITES) + "} [options] [--json PATH]",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUITES[argv[0]])
    return module.main(argv[1:])
