"""`python -m insclr.evaluate --model imagenet|random|CHECKPOINT --data roxford5k,rparis6k ...`"""

import sys
import time

from insclr import dist
from insclr.args import Parser, nonnegative_int, output_dir, output_file, positive_int
from insclr.io import print_error


def _parser():
    p = Parser(prog="python -m insclr.evaluate",
                                description="Retrieval evaluation: revisited Oxford/Paris (+R-1M), INSTRE, GLDv2.")
    p.add_argument("--model", required=True, help="imagenet | random | PATH of a model file or checkpoint")
    p.add_argument("--data", default="roxford5k,rparis6k",
                   help="comma-separated sets among roxford5k, rparis6k, instre, gldv2")
    p.add_argument("--shards-root", default="shards", help="folder holding the evaluation shard folders")
    p.add_argument("--distractors", default=None, help="revisitop1m shard folder: evaluate +R-1M")
    p.add_argument("--scales", default=None, help="comma-separated scales (default: the protocol's)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="longer side for every set (default: the protocol's)")
    p.add_argument("--json", default=None, metavar="PATH", type=output_file, help="write the results as JSON")
    p.add_argument("--show", type=nonnegative_int, default=0, metavar="N", help="draw N queries per set (PNG in --out)")
    p.add_argument("--html", default=None, metavar="DIR", type=output_dir,
                   help="write a result page DIR/index.html (queries, AP, top 10 marked; sortable by AP)")
    p.add_argument("--html-queries", type=positive_int, default=100, metavar="N",
                   help="queries per set on the page (default 100)")
    p.add_argument("--pr", default=None, metavar="PNG", type=output_file,
                   help="draw the mean precision–recall curve of every set")
    p.add_argument("--out", default="runs/eval", type=output_dir, help="folder of the pictures (default runs/eval)")
    p.add_argument("--save-features", default=None, metavar="DIR", type=output_dir,
                   help="save (and reuse) the set features")
    p.add_argument("--whiten", default=None, metavar="W.npz", help="also score the features whitened by "
                   "W.npz (python -m insclr.whiten), re-normalised")
    p.add_argument("--rerank", action="append", default=[], metavar="STEP",
                   help="also score after STEP (repeatable, applied in order, after --whiten): "
                        "aqe[:k=2,alpha=3] | dba[:k=10,alpha=3] | diffusion[:k=50,query_k=10,gamma=3,alpha=0.99,"
                        "truncate=1000,iterations=20,tol=1e-6] (last)")
    p.add_argument("--pca", default=None, metavar="DIMS",
                   help="also score PCA-whitening to each of DIMS (e.g. 128,256,512) fitted on the database, "
                        "not re-normalised (the original InsCLR INSTRE protocol)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default=None, choices=("auto", "fp16", "bf16", "none"),
                   help="autocast of the forward: auto (fp16 on CUDA) | fp16 | bf16 | none (default: none with "
                        "--dtype float32, the original's float32 forward; auto with --dtype float16)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="storage of the features: float32 (default, as the original) or float16 (half the "
                        "memory, for +R-1M)")
    p.add_argument("--arch", default=None, help="imagenet/random only")
    p.add_argument("--head", default=None, help="imagenet/random only (default identity)")
    p.add_argument("--dim", type=positive_int, default=None, help="imagenet/random only")
    return p


def check_inputs(datasets, shards_root, distractors):
    """Read every set's manifest and ground truth before any extraction, so that a misspelt name or
    a missing shard folder is reported at once (ValueError / FileNotFoundError naming it)."""
    from insclr.evaluate.datasets import load_eval_set
    from insclr.shard.manifest import Manifest

    for name in datasets:
        load_eval_set(name, shards_root)
    if distractors:
        Manifest.load(distractors)


def _variant_options(args):
    """(Whitening or None, [rerank.Step], pca dimensions) of --whiten / --rerank / --pca."""
    from insclr.evaluate.variants import parse_pca
    from insclr.rerank import parse_steps
    from insclr.whiten import load_whitening

    whitening = load_whitening(args.whiten) if args.whiten else None
    return whitening, parse_steps(args.rerank), parse_pca(args.pca) if args.pca else ()


def main(argv=None):
    args = _parser().parse_args(argv)
    from insclr.evaluate.core import evaluate, save_results, table_rows
    from insclr.evaluate.variants import rows_with_variants
    from insclr.features import parse_scales
    from insclr.io import print_table
    from insclr.model import load_model

    datasets = [d for d in args.data.split(",") if d]
    try:
        if not datasets:
            raise ValueError(f"--data {args.data!r}: name at least one evaluation set")
        check_inputs(datasets, args.shards_root, args.distractors)
        scales = parse_scales(args.scales) if args.scales else None
        whitening, steps, pca = _variant_options(args)
        device = dist.init(args.device)
        model = load_model(args.model, arch=args.arch, head=args.head, dim=args.dim, device=device)
    except (ValueError, FileNotFoundError) as e:
        print_error(e)
        return 2
    t0 = time.time()
    try:
        results = evaluate(model, datasets, args.shards_root, scales, device, show=args.show, out_dir=args.out,
                           distractors=args.distractors, save_features=args.save_features,
                           amp=args.amp or ("none" if args.dtype == "float32" else "auto"), size=args.size,
                           dtype=args.dtype, whitening=whitening, rerank=steps, pca=pca,
                           html=args.html, html_queries=args.html_queries, pr=args.pr)
    except (ValueError, FileNotFoundError) as e:  # a damaged image met during extraction, named
        print_error(e)
        return 2
    finally:
        dist.shutdown()
    if dist.rank() == 0:
        rows = rows_with_variants(results, table_rows)
        columns = list(dict.fromkeys(c for r in rows for c in r))
        print_table(rows, columns, title=f"model {args.model}  ({time.time() - t0:.1f} s)")
        if args.json:
            save_results(args.json, results, {"model": args.model, "data": datasets, "scales": scales,
                                              "distractors": args.distractors, "dtype": args.dtype,
                                              "seconds": time.time() - t0,
                                              "whiten": args.whiten, "rerank": args.rerank, "pca": args.pca})
            print(f"wrote {args.json}")
        if args.html:
            print(f"wrote {args.html}/index.html")
    return 0
