"""Benchmark `python -m insclr.bench loop`: the whole training loop, ours vs the original's shape.

Both sides train the same model on the same synthetic shards (GLDv2-like photo JPEGs of random
sizes) for the same steps of the same sampler (identical dataset indices per step, checked):

- ours: TrainLoader (DALI, random access into the tars, both views) -> train_step (insclr.train:
  our settings: autocast bf16 on CUDA and on a CPU with native bf16 (--amp), channels_last, fused
  Adam) -> memory bank on the training device (vectorised get);
- baseline, the original pipeline's shape: a torch DataLoader whose workers (as many as our DALI
  threads) read the JPEG files with Pillow and apply torchvision transforms
  (insclr.bench.baseline_loader), a float32 eager step with torch's default Adam, positive
  selection anchor by anchor, and a memory bank kept in host memory in float32 whose `get` is the
  per-group loop with numpy set operations (insclr/bench/reference_insclr.py); features go to the host
  for the bank and the drawn rows come back to the device, as in the original trainer.

Each side runs in its own process (fresh allocator, its own peak memory), alternating, `--repeats`
times; medians are reported. Figures per side: images/s over the timed steps (after warm-up), step
time, the fraction of the time spent waiting for data (`data_wait`), the peak RSS of the process
tree (main process + loader workers) and, on CUDA, the peak device memory. Headline `ratio` =
ours ÷ baseline images/s.

The bank holds every image of the synthetic set (the pool is insclr.bench.mining's clustered
synthetic pool, so bank v2 has candidates to traverse) and is filled once with the pool's
features before the first step: the memory loss runs from step 1 (steady state of a run).
The full-scale bank get (N = 1.2M) is measured by `python -m insclr.bench train` instead.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from insclr.bench import common

POOL_K = 50          # pool columns (>= the cluster size of the synthetic pool, >= potential_positive)
CLUSTER = 40         # images per cluster of the synthetic pool (insclr.bench.mining.make_pool)


# ---------------------------------------------------------------------------------------------- memory

def _tree_pids(pid):
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def tree_rss(pid=None):
    """Resident memory in bytes of a process and its descendants (Linux /proc; 0 elsewhere)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for p in _tree_pids(pid or os.getpid()):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


# ---------------------------------------------------------------------------------------------- set-up

def bench_config(args, device):
    """The training config of both sides: args.config (or the defaults: a base stage with bank v1)
    with the bench's data, model and memory settings."""
    from insclr.config import load_config

    base = load_config(args.config, [])
    over = [f"model.arch={args.arch}", "model.init=random", f"train.batch={args.anchors}",
            f"data.k={args.k}", f"train.device={device.type}", f"data.num_threads={args.threads}",
            "memory.start_step=0", "memory.get_step=0", "train.progress=false"]
    if args.config is None:  # defaults: an s1-like stage (norm_linear_norm 2048, bank v1)
        over += ["model.head=norm_linear_norm", "model.dim=2048", "memory.version=v1",
                 "memory.potential_positive=50", "data.crop_scale=[0.75,1.33]"]
    if args.size:
        over.append(f"data.size={args.size}")
    over.append(f"train.amp={ours_amp(args.amp, device)}")  # ours only: the baseline runs float32
    if args.noaug_size and base.noaug.enabled:
        over.append(f"noaug.size={args.noaug_size}")
    if base.memory.version == "v1" or args.config is None:
        over.append(f"memory.potential_positive={min(base.memory.potential_positive, POOL_K)}")
    over += list(args.set)
    return load_config(args.config, over)


def ours_amp(amp, device):
    """Our side's train.amp: --amp, where `auto` is our mixed precision for the device: bf16 on CUDA
    (train.amp=auto there) and on a CPU that computes bfloat16 natively (AMX / AVX512-BF16), float32
    on other CPUs (emulated bf16 is slower there). Training itself keeps float32 on every CPU unless
    asked (insclr.amp)."""
    from insclr.amp import cpu_has_native_bf16

    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "none"


def image_sizes(n, lo, hi, seed=0):
    """(width, height) of n images, each side uniform in [lo, hi] (GLDv2 photos: 640-1024 px)."""
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi + 1, size=(n, 2)).tolist()


def make_set(root, n, lo, hi, dim):
    """Shards + JPEG files of n synthetic photos, and the pool (neighbors, similarities, features)."""
    from insclr.bench.loader import make_data
    from insclr.bench.mining import make_pool

    shards, paths = make_data(root, n, 0, 0, sizes=image_sizes(n, lo, hi), workers=os.cpu_count() or 1)
    feats, neighbors, similarities = make_pool(n, dim, POOL_K, cluster=CLUSTER)
    np.savez(root / "pool.npz", neighbors=neighbors, similarities=similarities.astype(np.float32),
             feats=feats.numpy())
    (root / "paths.json").write_text(json.dumps([str(p) for p in paths]))
    return shards


def load_set(root):
    z = np.load(root / "pool.npz")
    paths = json.loads((root / "paths.json").read_text())
    from insclr.candidates import CandidatePool

    pool = CandidatePool.from_arrays(z["neighbors"].astype(np.int32), z["similarities"])
    return root / "shards", paths, pool, torch.from_numpy(z["feats"])


def fill(bank, feats):
    """Every row of the bank written once (counter 1) with the pool's features."""
    from insclr.mining import Views

    bank.fill(torch.arange(len(feats)), Views(feats, feats))


# ---------------------------------------------------------------------------------------------- sides

def our_step(state, settings, batch):
    """One step of ours (the training loop's call)."""
    from insclr.train.step import train_step

    return train_step(state, settings, batch)


def run_ours(cfg, device, root, warmup, steps):
    """Yield per step (indices, wait_s) after running it: TrainLoader -> train_step -> bank."""
    from insclr.data import NeighborBatchSampler
    from insclr.train.loop import make_loader, make_state

    shards, _, pool, feats = load_set(root)
    cfg.data.shards = str(shards)
    state, settings = make_state(cfg, device, pool)
    if state.bank.needs_fill:
        fill(state.bank, feats.to(device))
    sampler = NeighborBatchSampler(pool.neighbors, cfg.train.batch, cfg.data.k, seed=cfg.train.seed)
    loader = make_loader(cfg, sampler, device, 0)
    try:
        batches = iter(loader)
        for step in range(1, warmup + steps + 1):
            batch = next(batches)
            our_step(state, settings, batch)
            yield batch.indices, batch.wait_s
    finally:
        loader.close()


class LoopBankV1:
    """The original's v1 bank: float32 rows in host memory, candidates by numpy set operations."""

    def __init__(self, pool, dim, potential_positive, get_size):
        from insclr.mining import MemoryBankV1

        self.store = MemoryBankV1(pool, dim, potential_positive, get_size, device="cpu", dtype=torch.float32)
        self.size = pool.num_samples

    def fill(self, indices, views):
        self.store.fill(indices, views)

    def enqueue(self, indices, feats, noaug=None):
        from insclr.mining import Views

        self.store.update(indices.cpu(), Views(feats.detach().cpu()))

    def get(self, indices, labels, generator=None):
        from insclr.bench.mining import _reference

        drawn = _reference().v1_get_loop(self.store, indices.cpu(), generator)
        feats = self.store.bank[drawn]
        return feats, torch.full((len(drawn),), self.size + 1, dtype=torch.long), {}


class LoopBankV2:
    """The original's v2 bank: host float32 tables, `get` by the per-group loop (ReferenceBankV2)."""

    def __init__(self, cfg_memory, pool, dim):
        from insclr.bench.mining import _reference
        from insclr.mining import build_bank

        self.store = build_bank(cfg_memory, pool, dim, torch.device("cpu"))
        self.ref = _reference().ReferenceBankV2.from_bank(self.store)  # shares the host tables
        self.size, self.bank_noaug = pool.num_samples, self.store.bank_noaug

    def fill(self, indices, views):
        self.store.fill(indices, views)

    def enqueue(self, indices, feats, noaug):
        from insclr.mining import Views

        self.store.update(indices.cpu(), Views(feats.detach().cpu(), noaug.cpu()))

    def get(self, indices, labels, generator=None):
        got = self.ref.get(indices.cpu(), labels.cpu(), generator)
        return got.features, got.labels, got.stats


def baseline_bank(cfg, pool, dim):
    m = cfg.memory
    if m.version == "v1":
        return LoopBankV1(pool, dim, m.potential_positive, m.get_size)
    if m.version == "v2":
        return LoopBankV2(m, pool, dim)
    return None


def baseline_step(cfg, model, optimizer, scheduler, bank, device, step, indices, labels, aug, noaug,
                  generator):
    """One step in the original trainer's shape (benchmark/engine/trainer.py): float32 eager,
    no-aug features in eval mode, selection anchor by anchor on the host, bank on the host."""
    from insclr.bench.mining import _reference
    from insclr.loss import contrastive_loss
    from insclr.model import multiscale_features

    ref = _reference()
    aug = aug.to(device, non_blocking=True)
    g = None
    if cfg.noaug.enabled:
        model.eval()
        with torch.no_grad():
            g = multiscale_features(model, noaug.to(device, non_blocking=True), cfg.noaug.scales)
    model.train()
    f = model(aug)
    if cfg.selection.mode != "none":
        b = len(labels) // (cfg.data.k + 1)
        gc = g.cpu()
        labels = ref.select_positives_loop(gc[:b], gc[b:], labels, cfg.selection.mode, cfg.selection.thresh,
                                           cfg.selection.always_true)
    labels = labels.to(device)
    loss, _ = contrastive_loss(f, labels, f, labels, cfg.loss.margin, cfg.loss.pos_margin)
    log = {"batch_loss": loss.item()}
    if bank is not None:
        bank.enqueue(indices, f, g)
        generator.manual_seed(cfg.train.seed * 1_000_003 + step)
        ref_feats, ref_labels, _ = bank.get(indices, labels, generator)
        mem, _ = contrastive_loss(f, labels, ref_feats.to(device), ref_labels.to(device), cfg.loss.margin,
                                  cfg.loss.pos_margin, memory=True)
        log["memory_loss"] = mem.item()
        loss = loss + cfg.loss.memory_weight * mem
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    log["loss"] = loss.item()
    return log


def run_baseline(cfg, device, root, warmup, steps):
    """Yield per step (indices, wait_s): DataLoader + Pillow/torchvision -> float32 eager step -> host bank."""
    from insclr.bench.baseline_loader import baseline_loader
    from insclr.data import NeighborBatchSampler
    from insclr.train.loop import build_model
    from insclr.train.optim import build_optimizer, build_scheduler

    shards, paths, pool, feats = load_set(root)
    for key, value in (("amp", "none"), ("channels_last", False), ("compile", False)):
        setattr(cfg.train, key, value)
    _, model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.train, device, fused=False)
    scheduler = build_scheduler(optimizer, cfg.train)
    bank = baseline_bank(cfg, pool, model.out_dim)
    if bank is not None:
        fill(bank, feats)
    sampler = NeighborBatchSampler(pool.neighbors, cfg.train.batch, cfg.data.k, seed=cfg.train.seed)
    plan = [sampler.rank_batch(s) for s in range(warmup + steps)]
    noaug = cfg.noaug.size if cfg.noaug.enabled else None
    loader = baseline_loader(paths, plan, cfg.data.size, cfg.data.crop_scale, noaug, workers=cfg.data.num_threads)
    generator = torch.Generator()
    batches = iter(loader)
    for step in range(1, warmup + steps + 1):
        t0 = time.perf_counter()
        indices, labels, aug, noaug_images = next(batches)
        wait = time.perf_counter() - t0
        baseline_step(cfg, model, optimizer, scheduler, bank, device, step, indices, labels, aug,
                      noaug_images, generator)
        yield indices, wait
    del batches, loader


def measure(side, args):
    """Run one side in this process: {'images_per_s', 'step_s', 'data_wait', 'peak_rss_bytes', ...}."""
    device = torch.device(args.device)
    cfg = bench_config(args, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    rows = cfg.train.batch * (cfg.data.k + 1)
    runner = run_ours if side == "ours" else run_baseline
    keys, waits, step_times = [], [], []
    t_start = time.perf_counter()
    with common.PeakSampler(lambda: (tree_rss(),), 0.05) as rss:
        it = runner(cfg, device, Path(args.work), args.warmup, args.steps)
        for i, (indices, wait) in enumerate(it):
            keys.append([int(v) for v in indices])
            if i + 1 == args.warmup:
                sync()
                t0 = last = time.perf_counter()
                setup_s = t0 - t_start
            elif i + 1 > args.warmup:
                now = time.perf_counter()
                step_times.append(now - last)
                waits.append(wait)
                last = now
        sync()
        wall = time.perf_counter() - t0
    out = {"side": side, "rows": rows, "steps": args.steps, "wall_s": wall, "images_per_s": rows * args.steps / wall,
           "step_s": wall / args.steps, "step_times_s": step_times, "data_wait": min(sum(waits) / wall, 1.0),
           "setup_s": setup_s, "peak_rss_bytes": rss.peak[0], "keys": keys,
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


PHASES = ("data_wait", "noaug_forward", "forward", "batch_loss", "bank_enqueue", "bank_get", "memory_loss",
          "backward", "optimizer")


def profile_phases(args):
    """Our step taken apart, phase by phase with a device sync after each (what each costs alone):
    median ms per phase over the timed steps, and the whole unprofiled step for comparison.

    The phases call the pieces train_step is made of (insclr.train.step) in its order: the no-aug
    forward (eval mode, no gradient), the augmented forward, selection + batch loss, the bank's
    enqueue and get, the memory loss, backward of the total, clipping + Adam + LR step.
    """
    from insclr.data import NeighborBatchSampler
    from insclr.loss import contrastive_loss
    from insclr.amp import autocast
    from insclr.mining import Views
    from insclr.train.loop import make_loader, make_state
    from insclr.train.step import noaug_features, select, to_input

    device = torch.device(args.device)
    cfg = bench_config(args, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    shards, _, pool, feats = load_set(Path(args.work))
    cfg.data.shards = str(shards)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    state, settings = make_state(cfg, device, pool)
    if state.bank.needs_fill:
        fill(state.bank, feats.to(device))
    sampler = NeighborBatchSampler(pool.neighbors, cfg.train.batch, cfg.data.k, seed=cfg.train.seed)
    loader = make_loader(cfg, sampler, device, 0)
    times = {name: [] for name in PHASES}
    whole = []
    generator = torch.Generator(device=device)
    try:
        batches = iter(loader)
        for step in range(1, 2 * (args.warmup + args.steps) + 1):
            t = {}
            t0 = time.perf_counter()
            batch = next(batches)
            t["data_wait"] = time.perf_counter() - t0
            if step % 2 == 0:  # every other step: the real step, unprofiled
                sync()
                t1 = time.perf_counter()
                our_step(state, settings, batch)
                sync()
                if step // 2 > args.warmup:
                    whole.append(time.perf_counter() - t1)
                continue

            def phase(name, fn):
                t1 = time.perf_counter()
                out = fn()
                sync()
                t[name] = time.perf_counter() - t1
                return out

            g = phase("noaug_forward", lambda: noaug_features(state, settings, batch.noaug)) if cfg.noaug.enabled else None
            idx, lab = batch.indices.to(device), batch.labels.to(device)

            def forward():
                with autocast(device, settings.dtype):
                    return state.model(to_input(batch.aug, cfg.train.channels_last)).float()

            f = phase("forward", forward)

            def batch_loss():
                labels, _ = select(settings, lab, g)
                return labels, contrastive_loss(f, labels, f, labels, cfg.loss.margin, cfg.loss.pos_margin)[0]

            labels, loss = phase("batch_loss", batch_loss)
            if cfg.memory.version != "none":
                phase("bank_enqueue", lambda: state.bank.update(idx, Views(f.detach(), g)))
                generator.manual_seed(step)
                got = phase("bank_get", lambda: state.bank.get(idx, labels, generator=generator))
                ref, ref_labels = got.features, got.labels
                mem = phase("memory_loss", lambda: contrastive_loss(f, labels, ref.to(f.dtype), ref_labels,
                                                                    cfg.loss.margin, cfg.loss.pos_margin,
                                                                    memory=True)[0])
                loss = loss + cfg.loss.memory_weight * mem

            def backward():
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward()

            phase("backward", backward)

            def optimizer():
                params = [p for group in state.optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad if cfg.train.clip_grad > 0 else math.inf)
                state.optimizer.step()
                state.scheduler.step()

            phase("optimizer", optimizer)
            if (step + 1) // 2 > args.warmup:
                for name in PHASES:
                    times[name].append(t.get(name, 0.0))
    finally:
        loader.close()
    rows = cfg.train.batch * (cfg.data.k + 1)
    med = {name: common.median(v) for name, v in times.items()}
    return {"rows": rows, "arch": cfg.model.arch, "size": cfg.data.size, "memory": cfg.memory.version,
            "noaug_size": cfg.noaug.size if cfg.noaug.enabled else None, "phases_s": med,
            "sum_of_phases_s": sum(med.values()), "step_s": common.median(whole), "steps": len(whole),
            "device": str(device)}


def print_profile(prof):
    total = prof["sum_of_phases_s"]
    table = [{"phase": name, "ms": prof["phases_s"][name] * 1e3, "share_%": 100 * prof["phases_s"][name] / total}
             for name in PHASES]
    table.append({"phase": "sum of the phases", "ms": total * 1e3, "share_%": 100.0})
    whole = prof["step_s"] + prof["phases_s"]["data_wait"]
    table.append({"phase": "real step (unprofiled) + data wait", "ms": whole * 1e3, "share_%": 100 * whole / total})
    noaug = f", no-aug {prof['noaug_size']}" if prof["noaug_size"] else ""
    common.print_table(table, ["phase", "ms", "share_%"],
                       title=f"profile of our step: {prof['arch']} {prof['size']} px{noaug}, {prof['rows']} images, "
                             f"memory {prof['memory']}, {prof['device']}; medians of {prof['steps']} steps")


def run_child(side, args, argv):
    """measure(side) in a fresh interpreter; returns its figures."""
    out = Path(args.work) / f"{side}.json"
    cmd = [sys.executable, "-m", "insclr.bench.loop", "--side", side, *argv]
    env = dict(os.environ, INSCLR_NO_PROGRESS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench loop: the {side} side failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    figures = json.loads(out.read_text())
    out.unlink()
    return figures


# ---------------------------------------------------------------------------------------------- main

def build_parser():
    from insclr.args import nonnegative_int, positive_int

    cuda = torch.cuda.is_available()
    p = common.parser("The whole training loop (loader -> step -> bank), ours vs the original's shape.", "loop")
    p.add_argument("--config", default=None, help="training config (default: an s1-like stage with bank v1)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--steps", type=positive_int, default=30 if cuda else 8, help="timed steps per run")
    p.add_argument("--warmup", type=positive_int, default=5 if cuda else 2, help="steps before timing")
    p.add_argument("--anchors", type=positive_int, default=8 if cuda else 4,
                   help="anchors B per step (rows: B·(K+1)); GLDv2 s1 on 8 GPUs: 8 per rank")
    p.add_argument("--k", type=positive_int, default=3)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="our side's train.amp (the baseline is float32): auto = bf16 on CUDA and on a CPU with "
                        "native bfloat16 (AMX / AVX512-BF16), float32 on other CPUs")
    p.add_argument("--arch", default="resnet18" if not cuda else "resnet50")
    p.add_argument("--size", type=nonnegative_int, default=0 if cuda else 128,
                   help="augmented view side (0: the config's data.size)")
    p.add_argument("--noaug-size", type=nonnegative_int, default=0 if cuda else 144,
                   help="no-aug view side when the config has one (0: the config's noaug.size)")
    p.add_argument("--images", type=positive_int, default=1200 if cuda else 400,
                   help=f"synthetic images (= bank rows; a multiple of {CLUSTER})")
    p.add_argument("--min-side", type=positive_int, default=640 if cuda else 320)
    p.add_argument("--max-side", type=positive_int, default=1024 if cuda else 512)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 2,
                   help="our DALI CPU threads = the baseline's DataLoader workers")
    p.add_argument("--data", metavar="DIR", help="keep the synthetic set in DIR and reuse it when DIR has one "
                   "made with the same --images/--min-side/--max-side/dim (default: a temporary folder)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--profile", action="store_true",
                   help="instead: our step phase by phase (forward, backward, no-aug forward, bank, loss, ...)")
    p.add_argument("--side", choices=("ours", "baseline", "profile"), help=argparse_hidden())
    p.add_argument("--work", help=argparse_hidden())
    return p


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def same_keys(a, b):
    return a["keys"] == b["keys"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.side:  # a child: one side, figures to WORK/SIDE.json
        out = profile_phases(args) if args.side == "profile" else measure(args.side, args)
        (Path(args.work) / f"{args.side}.json").write_text(json.dumps(out))
        return 0
    if args.images % CLUSTER or args.images < 2 * CLUSTER:
        raise SystemExit(f"error: --images {args.images}: must be a multiple of {CLUSTER}, at least {2 * CLUSTER}")
    device = torch.device(args.device)
    cfg = bench_config(args, device)
    work = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="insclr-bench-loop-"))
    args.work = str(work)
    argv = argv + ["--work", str(work)]  # children use this set (with --data too)
    try:
        dim = cfg.model.dim if cfg.model.head != "identity" else 2048
        made = {"images": args.images, "min_side": args.min_side, "max_side": args.max_side, "dim": dim}
        stamp = work / "set.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == made):
            if args.data and work.exists():
                for name in ("shards", "jpg", "pool.npz", "paths.json", "set.json"):
                    shutil.rmtree(work / name, ignore_errors=True) if (work / name).is_dir() else \
                        (work / name).unlink(missing_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            print(f"writing {args.images} synthetic JPEGs ({args.min_side}-{args.max_side} px) in {work} ...",
                  flush=True)
            make_set(work, args.images, args.min_side, args.max_side, dim)
            stamp.write_text(json.dumps(made))
            print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
        if args.profile:
            prof = run_child("profile", args, argv)
            print_profile(prof)
            # headline of a profile: the phases' sum ÷ the real step (> 1: the real step overlaps what
            # the profile serialises; ~1: the phases account for the step)
            ratio = prof["sum_of_phases_s"] / prof["step_s"]
            print(f"\nthe phases, each synchronised, sum to {ratio:.3f} x the real step")
            if args.json:
                common.write_json(args.json, {"suite": "loop", "mode": "profile", "ratio": ratio,
                                              "ratio_means": "sum of the synchronised phases / the real step",
                                              "machine": common.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                              "profile": prof})
            return 0
        runs = {"ours": [], "baseline": []}
        for r in range(args.repeats):
            for side in (("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")):
                fig = run_child(side, args, argv)
                runs[side].append(fig)
                print(f"  run {r + 1}/{args.repeats} {side}: {fig['images_per_s']:.1f} img/s, "
                      f"step {fig['step_s'] * 1e3:.0f} ms, data_wait {fig['data_wait']:.1%}", flush=True)
    finally:
        if not args.data:
            shutil.rmtree(work, ignore_errors=True)
    identical = all(same_keys(o, b) for o, b in zip(runs["ours"], runs["baseline"]))
    summary = {}
    for side, figs in runs.items():
        summary[side] = {key: common.median([f[key] for f in figs]) for key in
                         ("images_per_s", "step_s", "data_wait", "peak_rss_bytes", "setup_s")
                         + (("peak_device_bytes",) if device.type == "cuda" else ())}
        summary[side]["runs_images_per_s"] = [f["images_per_s"] for f in figs]
    ratio = summary["ours"]["images_per_s"] / summary["baseline"]["images_per_s"]
    rows = cfg.train.batch * (cfg.data.k + 1)
    mem_key = "peak_device_bytes" if device.type == "cuda" else "peak_rss_bytes"
    amp = {"none": "fp32"}.get(cfg.train.amp, cfg.train.amp) + (", compiled" if cfg.train.compile else "")
    table = [{"loop": f"ours: TrainLoader -> train_step ({amp}) -> bank", **_row(summary["ours"], mem_key)},
             {"loop": "original shape: DataLoader + Pillow, fp32 eager, host loop bank",
              **_row(summary["baseline"], mem_key)}]
    mem_col = "peak_device_MB" if device.type == "cuda" else "peak_RSS_MB"
    noaug = f", no-aug {cfg.noaug.size}" if cfg.noaug.enabled else ""
    title = (f"{cfg.model.arch} {cfg.data.size} px{noaug}, {cfg.train.batch}x(1+{cfg.data.k}) = {rows} images/step, "
             f"memory {cfg.memory.version} (N {args.images}), {args.threads} threads/workers, {device}; "
             f"medians of {args.repeats} runs x {args.steps} steps")
    common.print_table(table, ["loop", "images_per_s", "step_ms", "data_wait_%", mem_col], title=title)
    print(f"same dataset indices per step on both sides: {identical}")
    config = {k: v for k, v in vars(args).items() if k not in ("side", "work")}
    common.report("loop", ratio, {"config": config, "rows": rows, "arch": cfg.model.arch, "size": cfg.data.size,
                                  "noaug_size": cfg.noaug.size if cfg.noaug.enabled else None,
                                  "memory": cfg.memory.version, "ours_amp": cfg.train.amp, "same_keys": identical,
                                  **summary,
                                  "runs": {s: [{k: v for k, v in f.items() if k != "keys"} for f in figs]
                                           for s, figs in runs.items()}}, args.json)
    return 0 if identical else 1


def _row(s, mem_key):
    return {"images_per_s": s["images_per_s"], "step_ms": s["step_s"] * 1e3, "data_wait_%": 100 * s["data_wait"],
            ("peak_device_MB" if mem_key == "peak_device_bytes" else "peak_RSS_MB"): s[mem_key] / 2**20}


if __name__ == "__main__":
    sys.exit(main())
