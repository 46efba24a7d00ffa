"""`python -m insclr.bench extract`: feature extraction through the real loader vs the model alone.

ours     = insclr.features.extract over a StreamLoader (DALI decode + square resize, normalise,
           multi-scale forward, gather): images/s over the whole shard split.
baseline = the same multi-scale forward (same autocast, channels_last) on ready, normalised
           tensors of the same shape already on the device: the model's own throughput.
ratio    = ours / baseline; ≥ 0.8 means the data path is not the bottleneck.
A third row times the loader alone (no model) for diagnosis.

Defaults are sized for a small CPU: ResNet-18 at 224 px, scales (1, 1/√2, 1/2), batch 16, on
the tiny synthetic GLDv2 set (generated and sharded into a temporary folder unless --shards
or --images is given). The recipe's setting is --arch resnet101 --size 512 on a GPU.
"""

import math
import tempfile
import time
from pathlib import Path

import torch

from insclr.bench.common import median, parser, print_table, report, timed


def tiny_gldv2(root):
    """Synthesise the tiny GLDv2 set under root and shard it; returns the shard folder."""
    from insclr.shard import shard_dataset
    from insclr.synth import generate

    generate(root / "synth", seed=0, scale="tiny", datasets=["gldv2"])
    out = root / "shards" / "gldv2"
    shard_dataset("gldv2", root / "synth" / "gldv2", out, per_shard=64)
    return out


def _sync(device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def measure(shards, args, device):
    from insclr.amp import amp_dtype, autocast
    from insclr.data import StreamLoader
    from insclr.features import extract
    from insclr.model import load_model, multiscale_features

    scales = tuple(float(s) for s in args.scales.split(","))
    dtype = amp_dtype(args.amp, device, cuda_auto="fp16", key="--amp")
    model = load_model("random", arch=args.arch, head="identity", device=device).eval()
    model = model.to(memory_format=torch.channels_last)
    loader = StreamLoader(shards, mode="square", size=args.size, batch_size=args.batch, device=device,
                          num_threads=args.threads)
    n, batches = loader.num_samples, len(loader)
    ready = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)

    @torch.no_grad()
    def model_only():
        for _ in range(batches):
            with autocast(device, dtype):
                multiscale_features(model, ready, scales).half().cpu()

    def loader_only():
        for images, _ in loader:
            images.sum()

    def pipeline():
        extract(model, loader, scales, device, args.amp, show=False)

    sync = _sync(device)
    with torch.no_grad(), autocast(device, dtype):  # warm the model up on one batch only:
        multiscale_features(model, ready, scales)    # the loader-only row warms DALI up
    figures = {}
    for name, fn in (("loader only", loader_only), ("model only (baseline)", model_only),
                     ("extract (ours)", pipeline)):
        times = timed(fn, repeats=args.repeats, warmup=int(fn is loader_only), sync=sync)
        images = batches * args.batch if fn is model_only else n
        figures[name] = {"name": name, "images": images, "median_s": median(times),
                         "images_per_s": images / median(times), "times_s": times}
    return figures


def main(argv=None):
    from insclr.args import nonnegative_int, positive_int

    p = parser("feature extraction: real loader vs the model's own forward throughput", "extract")
    p.add_argument("--shards", default=None, help="shard folder (default: tiny synthetic GLDv2, made here)")
    p.add_argument("--images", type=nonnegative_int, default=0,
                   help="instead of the tiny GLDv2 set: N synthetic 640x480 JPEGs in one shard (a GPU "
                        "needs more images than the tiny set's 119 to reach its steady rate)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--scales", default=f"1,{1 / math.sqrt(2):.4f},0.5")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--threads", type=positive_int, default=2, help="DALI threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "fp16", "bf16", "none"))
    args = p.parse_args(argv)
    from insclr.dist import resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.shards:
            shards = Path(args.shards)
        elif args.images:
            from insclr.bench.loader import make_data

            shards, _ = make_data(Path(tmp), args.images, 640, 480)
            print(f"wrote {args.images} synthetic 640x480 JPEGs in {time.perf_counter() - t0:.1f} s")
        else:
            shards = tiny_gldv2(Path(tmp))
            print(f"made the tiny synthetic GLDv2 shards in {time.perf_counter() - t0:.1f} s")
        figures = measure(shards, args, device)
    rows = list(figures.values())
    print_table(rows, ["name", "images", "median_s", "images_per_s"],
                title=f"\n{args.arch} at {args.size}px, scales {args.scales}, batch {args.batch}, {device} "
                      f"(median of {args.repeats}; torch threads {torch.get_num_threads()})")
    ratio = figures["extract (ours)"]["images_per_s"] / figures["model only (baseline)"]["images_per_s"]
    report("extract", ratio, {"args": vars(args), "device": str(device), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
