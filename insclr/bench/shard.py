"""Benchmark `python -m insclr.bench shard`: sharding throughput vs. the pure Pillow decode rate.

Ours: `shard_dataset("gldv2", ...)` on the synthetic GLDv2 train set into a fresh folder
(read, full decode/validation, tar + DALI index + records + manifest), images/s and MB/s of
input. Baseline: `Image.open(path).load()` over the same images in one process, times the
worker count: decoding every image once is the floor of what validation costs, so the ratio
says how much of the machine's decode capacity the job turns into shards (target >= 0.8).
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

from insclr.bench.common import median, parser, print_table, report


def decode_all(paths):
    """Decode every image fully with Pillow (the baseline's work)."""
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            image.load()


def main(argv=None):
    from insclr.args import nonnegative_int, positive_int

    p = parser("Sharding throughput (images/s, MB/s) vs. Pillow's decode rate x workers.", "shard")
    p.add_argument("--workers", type=positive_int, default=1, help="sharding processes (default 1)")
    p.add_argument("--scale", default="small", choices=("tiny", "small"), help="synthetic GLDv2 size")
    p.add_argument("--data", metavar="DIR", help="an existing `python -m insclr.synth` root to reuse "
                                                 "(default: generate one in a temporary folder)")
    p.add_argument("--min-images", type=nonnegative_int, default=15, help="GLDv2 landmark filter, as in the recipe")
    p.add_argument("--times", type=positive_int, default=1,
                   help="list each image this many times (a `folder` list file), so that start-up costs "
                        "(worker processes) weigh as little as in a real-size job")
    args = p.parse_args(argv)

    from insclr.shard import shard_dataset
    from insclr.shard.sources import read_source

    work = Path(tempfile.mkdtemp(prefix="insclr-bench-shard-"))
    try:
        data = Path(args.data) if args.data else work / "synth"
        if not args.data:
            from insclr.synth import generate

            print(f"generating synthetic GLDv2 ({args.scale}) in {data} ...")
            generate(data, seed=0, scale=args.scale, datasets=["gldv2"])
        src = data / "gldv2"
        paths = [item.path for item in read_source("gldv2", src, args.min_images).splits["part"]]
        dataset, options = "gldv2", {"min_images": args.min_images}
        if args.times > 1:  # the same images, listed repeatedly: a list file for the `folder` reader
            paths = paths * args.times
            src = work / "images.txt"
            src.write_text("".join(f"{Path(path).resolve()}\n" for path in paths))
            dataset, options = "folder", {}
        mbytes = sum(os.path.getsize(p) for p in paths if os.path.exists(p)) / 2**20
        decode_all(paths)  # warm the page cache so both sides read from memory
        ours, base = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            decode_all(paths)
            base.append(time.perf_counter() - t0)
            out = work / f"shards{r}"
            t0 = time.perf_counter()
            shard_dataset(dataset, src, out, workers=args.workers, **options)
            ours.append(time.perf_counter() - t0)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(paths)
    t_ours, t_base = median(ours), median(base)
    ours_rate, decode_rate = n / t_ours, n / t_base
    baseline_rate = decode_rate * args.workers
    rows = [
        {"method": "insclr.shard", "workers": args.workers, "images": n, "seconds": t_ours,
         "images/s": ours_rate, "MB/s": mbytes / t_ours},
        {"method": "Pillow decode (1 process)", "workers": 1, "images": n, "seconds": t_base,
         "images/s": decode_rate, "MB/s": mbytes / t_base},
        {"method": f"Pillow decode x {args.workers}", "workers": args.workers, "images": n, "seconds": "",
         "images/s": baseline_rate, "MB/s": mbytes / t_base * args.workers},
    ]
    print_table(rows, ["method", "workers", "images", "seconds", "images/s", "MB/s"],
                title=f"sharding synthetic GLDv2 ({args.scale}, {n} images = {args.times} x the set, {mbytes:.1f} MB), "
                      f"median of {args.repeats}")
    figures = {"workers": args.workers, "scale": args.scale, "images": n, "times": args.times, "input_mb": mbytes,
               "ours_images_per_s": ours_rate, "ours_mb_per_s": mbytes / t_ours,
               "decode_images_per_s_1proc": decode_rate, "baseline_images_per_s": baseline_rate,
               "ours_seconds": ours, "baseline_seconds": base, "target_ratio": 0.8}
    report("shard", ours_rate / baseline_rate, figures, json_path=args.json)
    return 0
