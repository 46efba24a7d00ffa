"""Benchmark `python -m insclr.bench loader`: the training loader vs the original DataLoader.

Ours: TrainLoader (DALI, random access into the tars) producing both views of B anchors + K
neighbours per step, then `normalize` of both views on the device (so both sides end with
normalised float tensors). Baseline: insclr.bench.baseline_loader (Pillow + torchvision in
DataLoader workers, as many workers as our CPU threads). Same synthetic JPEGs (stored in the
shards and as files), same rows per step, same cores, one run. Also: StreamLoader images/s
(square 512, feature extraction).
"""

import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from insclr.bench.common import median, parser, print_table, report
from insclr.synth.pool import random_pool


def synth_jpeg(rng, width, height):
    """A photo-like JPEG: smooth colour field plus fine noise (so it compresses like a photo)."""
    from PIL import Image

    small = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _sized_jpeg(job):
    seed, i, width, height = job
    return synth_jpeg(np.random.default_rng([seed, i]), width, height)


def make_data(root, n, width, height, seed=0, sizes=None, workers=1):
    """Write n JPEGs as files (root/jpg) and as one shard folder (root/shards); return the paths.

    sizes: optional [(width, height)] * n, one size per image (else all width x height); image i
    is then drawn from Generator([seed, i]), by `workers` processes."""
    from insclr.synth.shards import write_manifest, write_split

    per_image = sizes is not None
    sizes = [[int(w), int(h)] for w, h in sizes] if per_image else [[width, height]] * n
    if per_image:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(seed, i, w_i, h_i) for i, (w_i, h_i) in enumerate(sizes)]
        # spawn, not fork: a fork of a process with torch/DALI threads can inherit a held lock
        # and hang (seen in the test suite: workers asleep on a futex)
        with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            jpegs = list(pool.map(_sized_jpeg, jobs, chunksize=8))
    else:
        rng = np.random.default_rng(seed)
        jpegs = [synth_jpeg(rng, width, height) for _ in range(n)]
    (root / "jpg").mkdir(parents=True)
    paths = [root / "jpg" / f"{i}.jpg" for i in range(n)]
    for path, data in zip(paths, jpegs):
        path.write_bytes(data)
    samples = [(data, {"index": i, "id": str(i), "label": None, "size": size, "orig_size": size})
               for i, (data, size) in enumerate(zip(jpegs, sizes))]
    sh = root / "shards"
    sh.mkdir(exist_ok=True)
    write_manifest(sh, {"part": write_split(sh, "part", samples)}, dataset="bench", command=["insclr.bench.loader"])
    return sh, paths


def rates(batches, rows, steps, repeats, warmup, finish):
    """images/s of `repeats` windows of `steps` batches from the iterator `batches` (after warmup)."""
    for _ in range(warmup):
        finish(next(batches))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            finish(next(batches))
        out.append(rows * steps / (time.perf_counter() - t0))
    return out


def main(argv=None):
    from insclr.args import nonnegative_int, positive_float, positive_int

    p = parser("Training-loader images/s (both views) vs a Pillow + torchvision DataLoader.", "loader")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--images", type=positive_int, default=256, help="synthetic JPEGs in the set")
    p.add_argument("--width", type=positive_int, default=640)
    p.add_argument("--height", type=positive_int, default=480)
    p.add_argument("--batch", type=positive_int, default=16, help="anchors B per step")
    p.add_argument("--k", type=positive_int, default=3, help="neighbours K per anchor")
    p.add_argument("--size", type=positive_int, default=224, help="augmented view side")
    p.add_argument("--noaug", type=nonnegative_int, default=512, help="no-aug view side (0 = no such view)")
    p.add_argument("--crop-scale", type=positive_float, nargs=2, default=(0.75, 1.33))
    p.add_argument("--threads", type=positive_int, default=2, help="our DALI CPU threads = baseline workers")
    p.add_argument("--steps", type=positive_int, default=6, help="steps per timed repetition")
    args = p.parse_args(argv)

    from insclr.bench.baseline_loader import baseline_loader
    from insclr.data import NeighborBatchSampler, StreamLoader, TrainLoader, normalize

    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = args.batch * (args.k + 1)
    total = 2 + args.steps * args.repeats
    work = Path(tempfile.mkdtemp(prefix="insclr-bench-loader-"))
    try:
        print(f"writing {args.images} synthetic {args.width}x{args.height} JPEGs in {work} ...")
        shards, paths = make_data(work, args.images, args.width, args.height)
        nb = random_pool(args.images, args.k).neighbors
        noaug = args.noaug or None

        def finish_ours(b):
            normalize(b.aug)
            if b.noaug is not None:
                normalize(b.noaug)
            sync()

        sampler = NeighborBatchSampler(nb, args.batch, args.k, seed=0)
        loader = TrainLoader(shards, sampler, args.size, args.crop_scale, noaug_size=noaug, device=device,
                             num_threads=args.threads, seed=0)
        ours = rates(iter(loader), rows, args.steps, args.repeats, 2, finish_ours)
        loader.close()

        steps = [NeighborBatchSampler(nb, args.batch, args.k, seed=0).rank_batch(s) for s in range(total)]
        base_loader = baseline_loader(paths, steps, args.size, args.crop_scale, noaug, workers=args.threads)

        def finish_base(b):
            for t in b[2:]:
                t.to(device, non_blocking=True)
            sync()

        base = rates(iter(base_loader), rows, args.steps, args.repeats, 2, finish_base)
        del base_loader

        stream = StreamLoader(shards, mode="square", size=512, batch_size=32, device=device,
                              num_threads=args.threads)

        def stream_pass():
            for images, _ in stream:
                normalize(images)
            sync()

        t0 = time.perf_counter()
        stream_pass()  # the first pass builds the pipeline (about 2 s on a GPU); later passes reuse it
        stream_first_s = time.perf_counter() - t0
        t_stream = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            stream_pass()
            t_stream.append(args.images / (time.perf_counter() - t0))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ours_m, base_m, stream_m = median(ours), median(base), median(t_stream)
    config = (f"B={args.batch} K={args.k} ({rows} rows/step), aug {args.size}, noaug {args.noaug or 'off'}, "
              f"{args.width}x{args.height} JPEGs, {args.threads} threads, {args.device}")
    print_table([{"loader": "TrainLoader (DALI, ours)", "images/s (median)": ours_m, "runs": len(ours)},
                 {"loader": "DataLoader + Pillow/torchvision", "images/s (median)": base_m, "runs": len(base)},
                 {"loader": "StreamLoader square 512 (ours)", "images/s (median)": stream_m, "runs": len(t_stream)}],
                ["loader", "images/s (median)", "runs"], title=config)
    print(f"StreamLoader's first pass (builds the pipeline): {stream_first_s:.2f} s for {args.images} images")
    report("loader", ours_m / base_m, {
        "config": vars(args), "train_images_per_s": ours_m, "baseline_images_per_s": base_m,
        "stream_images_per_s": stream_m, "stream_first_pass_s": stream_first_s, "train_runs": ours, "baseline_runs": base, "stream_runs": t_stream},
        args.json)
    return 0
