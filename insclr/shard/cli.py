"""`python -m insclr.shard DATASET --src DIR --out shards/NAME [...]` and `--verify shards/NAME`."""

import sys

from insclr.args import Parser, existing_dir, nonnegative_int, output_dir, positive_float, positive_int
from insclr.io import output_lock, print_error
from insclr.shard.images import DEFAULT_MAX_PIXELS
from insclr.shard.sources import DATASETS


def build_parser():
    p = Parser(
        prog="python -m insclr.shard",
        description="Repack a dataset (original layout) into WebDataset tar shards with DALI indexes, "
                    "or verify a shard folder.")
    p.add_argument("dataset", nargs="?", choices=DATASETS, help="which reader to use for --src")
    p.add_argument("--src", help="the dataset's own folder (e.g. data/roxford5k); for 'folder' a folder "
                                 "or a text file listing image paths")
    p.add_argument("--out", type=output_dir, help="output shard folder (e.g. shards/roxford5k); re-running resumes")
    p.add_argument("--verify", metavar="DIR", type=existing_dir,
                   help="check the shard folder DIR and exit (non-zero on problems)")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help="re-encode images whose longer side exceeds this (others keep their bytes)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=positive_float, default=1024, metavar="MB",
                      help="start a new shard before the tar would pass this many MiB (default 1024)")
    size.add_argument("--per-shard", type=positive_int, default=None, metavar="N", help="samples per shard")
    p.add_argument("--workers", type=positive_int, default=1, help="decoding processes (default 1)")
    p.add_argument("--min-images", type=nonnegative_int, default=15,
                   help="gldv2: drop landmarks with fewer listed images (default 15)")
    p.add_argument("--exif-transpose", action="store_true",
                   help="store the pixels rotated by their EXIF orientation (default: as stored, as the original "
                        "reads them); refused for roxford5k, rparis6k and instre, whose query boxes are drawn "
                        "on the stored pixels")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help="reject images with more pixels than this from their header (decompression bombs)")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.verify:
        from insclr.shard.verifier import verify

        problems = verify(args.verify)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if not (args.dataset and args.src and args.out):
        build_parser().error("DATASET, --src and --out are required (or --verify DIR)")
    from insclr.shard.job import shard_dataset

    try:
        with output_lock(args.out):
            manifest = shard_dataset(args.dataset, args.src, args.out, max_side=args.max_side,
                                     shard_size_mb=args.shard_size, per_shard=args.per_shard,
                                     workers=args.workers, min_images=args.min_images, max_pixels=args.max_pixels,
                                     exif_transpose=args.exif_transpose,
                                     command=["python", "-m", "insclr.shard", *argv])
    except (OSError, ValueError) as e:
        print_error(e)
        return 2
    rejected = len(manifest.data["rejected"])
    counts = ", ".join(f"{s} {manifest.num_samples(s)}" for s in manifest.splits)
    print(f"{args.out}: {counts} samples in {sum(len(manifest.shards(s)) for s in manifest.splits)} shard(s); "
          f"{rejected} input(s) rejected (see manifest.json 'rejected')")
    return 0
