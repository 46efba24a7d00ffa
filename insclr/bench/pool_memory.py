"""`python -m insclr.bench pool-memory`: host memory of one rank's candidate pool, mapped vs read and widened.

A synthetic pool (insclr.synth.pool, no images or features) of N x k (default 1.2M x 500, GLDv2
scale: 3.6 GB on disk) is written once; then each variant runs in a fresh subprocess, as one
training rank does at set-up: load the pool with its checks, build the sampler, build bank v2
(the pool part of its set-up: neighbours and the pb/nb boundaries; its feature tables, which
live on the GPU in training, get dimension 1 here so they do not hide the pool's cost).

- ours: `CandidatePool.open` (memory maps of the stored .npy members, int32 / the stored
  similarity dtype, --dtype: float32 as python -m insclr.pool writes by default, or float16);
- baseline: the loader before issue 14 (kept below): np.load reads both arrays, then they are
  widened to int64 / float32, the sampler copies its columns to int64 and bank v2 copies the
  neighbours back to int32.

Peak private memory is the peak of RssAnon (/proc/self/status, sampled every 2 ms) above the
level after the imports: memory this rank alone holds. The file pages a memory map touches are
page cache, counted in RssFile and shared by every rank of the node; reported separately. The
baseline peaks near 18·N·k bytes (10.8 GB at the default: the read arrays and their widened
copies at once), so by default it is measured at --baseline-n rows and scaled
linearly to N (its memory is linear in N: whole-array copies); pass --baseline-n N to measure
it at full size on a machine with the memory. The headline ratio is baseline / ours peak
private memory at N (higher is better).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from insclr.bench.common import PeakSampler, parser, print_table, report

DIM = 1         # bank feature tables (on the GPU in training) kept negligible here
K_TRAIN = 3      # data.k of the recipes
THRESH = (0.75, 0.5)


def rss_anon_file():
    """(RssAnon, RssFile) of this process in bytes, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"]


# ----------------------------------------------------------------------------- the variants


def baseline_load(path, block=1 << 16):
    """The pool loader before issue 14 (insclr.pool.read_pool + insclr.train.loop.load_pool as they
    were): read both arrays, check them in blocks, then widen them to int64 / float32."""
    with np.load(path) as z:
        neighbors, similarities = z["neighbors"], z["similarities"]
    for start in range(0, len(neighbors), block):
        stop = start + block
        if not np.isfinite(similarities[start:stop]).all():
            raise ValueError(f"{path}: NaN similarities")
        rows = np.arange(start, start + len(neighbors[start:stop]))[:, None]
        if (neighbors[start:stop] == rows).any():
            raise ValueError(f"{path}: a row lists itself")
    if neighbors.min() < 0 or neighbors.max() >= len(neighbors):
        raise ValueError(f"{path}: neighbour indices out of range")
    return neighbors.astype(np.int64), similarities.astype(np.float32)


def run_variant(variant, path):
    """One rank's pool set-up in this process; returns its figures (bytes, seconds)."""
    import torch

    from insclr.candidates import CandidatePool
    from insclr.data import NeighborBatchSampler
    from insclr.mining import MemoryBankV2, boundaries

    torch.set_num_threads(1)
    with PeakSampler(rss_anon_file, 0.002) as mem:
        t0 = time.perf_counter()
        if variant == "ours":
            pool = CandidatePool.open(path)
            pool.check_for_training(pool.num_samples, K_TRAIN)
            sampler_neighbors = pool.neighbors
        else:
            neighbors, similarities = baseline_load(path)
            sampler_neighbors = neighbors[:, :K_TRAIN].astype(np.int64)  # the sampler's copy
        load_s = time.perf_counter() - t0
        sampler = NeighborBatchSampler(sampler_neighbors, 8, K_TRAIN, seed=0)
        for _ in range(3):
            sampler.next()
        t1 = time.perf_counter()
        if variant == "ours":
            bank = MemoryBankV2(pool, DIM, *THRESH, "b+i_tr4_avg0.60_k05", 100)
        else:  # the bank set-up before issue 14: int32 copy of the int64 neighbours, float32 boundaries
            bank = (torch.from_numpy(neighbors).to(torch.int32), boundaries(similarities, THRESH[0]),
                    boundaries(similarities, THRESH[1]))
        bank_s = time.perf_counter() - t1
    del bank
    (anon, file), (start_anon, start_file) = mem.peak, mem.start
    return {"variant": variant, "private_peak_bytes": anon - start_anon, "rss_anon_peak_bytes": anon,
            "shared_file_peak_bytes": file - start_file, "load_s": load_s, "bank_v2_setup_s": bank_s}


def measure(variant, path):
    """run_variant in a fresh Python process (nothing allocated earlier hides in its peak)."""
    code = ("import json, sys; from insclr.bench.pool_memory import run_variant; "
            "print(json.dumps(run_variant(sys.argv[1], sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, variant, str(path)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"pool-memory {variant}: subprocess failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(n=1_200_000, k=500, baseline_n=200_000, folder=None, dtype="float32"):
    """Figures of both variants; the baseline scaled from baseline_n rows to n when smaller."""
    from insclr.synth.pool import write_pool

    baseline_n = min(baseline_n, n)
    with tempfile.TemporaryDirectory(dir=folder, prefix="pool-memory-") as tmp:
        big = write_pool(Path(tmp) / "pool.npz", n, k, show=True, dtype=np.dtype(dtype))
        ours = measure("ours", big)
        small = big if baseline_n == n else write_pool(Path(tmp) / "pool_small.npz", baseline_n, k,
                                                       dtype=np.dtype(dtype))
        base = measure("baseline", small)
    scale = n / baseline_n
    base_at_n = {key: base[key] * scale for key in ("private_peak_bytes", "load_s", "bank_v2_setup_s")}
    return {"n": n, "k": k, "dtype": dtype, "baseline_n": baseline_n, "baseline_extrapolated": baseline_n != n,
            "file_bytes": n * k * (4 + np.dtype(dtype).itemsize), "ours": ours, "baseline": base, "baseline_at_n": base_at_n,
            "ours_private_gb": ours["private_peak_bytes"] / 1e9,
            "baseline_private_gb": base_at_n["private_peak_bytes"] / 1e9,
            "per_node_8_ranks_gb": {"ours": 8 * ours["private_peak_bytes"] / 1e9
                                    + n * k * (4 + np.dtype(dtype).itemsize) / 1e9,
                                    "baseline": 8 * base_at_n["private_peak_bytes"] / 1e9},
            "bank_v2_setup_ratio": base_at_n["bank_v2_setup_s"] / ours["bank_v2_setup_s"],
            "ratio": base_at_n["private_peak_bytes"] / max(ours["private_peak_bytes"], 1)}


def main(argv=None):
    from insclr.args import positive_int

    p = parser("host memory of one rank's candidate pool: memory-mapped vs read and widened", "pool-memory")
    p.add_argument("--n", type=positive_int, default=1_200_000, help="pool rows (default 1.2M, GLDv2)")
    p.add_argument("--k", type=positive_int, default=500, help="neighbours per row (default 500)")
    p.add_argument("--baseline-n", type=positive_int, default=200_000,
                   help="rows at which the baseline is measured, scaled linearly to --n (default 200000; "
                        "it needs ~18·N·k bytes)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="stored similarities (default float32, as python -m insclr.pool writes)")
    p.add_argument("--dir", default=None, help="folder for the temporary pool file (default: the system's)")
    args = p.parse_args(argv)
    fig = run(args.n, args.k, args.baseline_n, args.dir, args.dtype)
    gb = 1e9
    note = f" (measured at {fig['baseline_n']} rows, x{fig['n'] / fig['baseline_n']:.1f})" \
        if fig["baseline_extrapolated"] else ""
    rows = [{"what": "private peak per rank (GB)", "ours": fig["ours_private_gb"],
             "baseline": fig["baseline_private_gb"], "ratio": fig["ratio"]},
            {"what": "shared page cache per node (GB)", "ours": fig["ours"]["shared_file_peak_bytes"] / gb,
             "baseline": 0.0, "ratio": float("nan")},
            {"what": "8-rank node total (GB)", "ours": fig["per_node_8_ranks_gb"]["ours"],
             "baseline": fig["per_node_8_ranks_gb"]["baseline"],
             "ratio": fig["per_node_8_ranks_gb"]["baseline"] / fig["per_node_8_ranks_gb"]["ours"]},
            {"what": "load + checks (s)", "ours": fig["ours"]["load_s"], "baseline": fig["baseline_at_n"]["load_s"],
             "ratio": fig["baseline_at_n"]["load_s"] / fig["ours"]["load_s"]},
            {"what": "bank v2 set-up (s)", "ours": fig["ours"]["bank_v2_setup_s"],
             "baseline": fig["baseline_at_n"]["bank_v2_setup_s"], "ratio": fig["bank_v2_setup_ratio"]}]
    print(f"candidate pool {fig['n']} x {fig['k']} ({fig['file_bytes'] / gb:.1f} GB on disk); baseline{note}")
    print_table(rows, ["what", "ours", "baseline", "ratio"])
    report("pool-memory", fig["ratio"], fig, args.json)
    return 0
