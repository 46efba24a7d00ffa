"""`python -m insclr.bench parity --original PATH`: our trainer side by side with the original InsCLR
trainer (a developer's checkout of justforforfor/insclr; nothing is fetched) on the synthetic set,
from the same initial weights, for several seeds; both final models evaluated by our evaluator.

Prints the per-seed mAP (Medium) table with mean, spread (sample standard deviation) and Welch's t
(ours minus the original). See docs/parity.md.
"""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def parse_args(argv):
    from insclr.args import Parser

    p = Parser(prog="python -m insclr.bench parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--original", default=None, help="checkout of justforforfor/insclr (needed for the original)")
    p.add_argument("--config", default="configs/demo.yaml", help="our training config (the s1 recipe kind)")
    p.add_argument("--gldv2", default="datasets/synth/gldv2", help="the synthetic GLDv2 folder the shards come from")
    p.add_argument("--shards-root", default="shards/demo", help="folder with gldv2/, roxford5k/, rparis6k/ shards")
    p.add_argument("--pool", default="runs/demo/s0_pool/pool.npz", help="stage-0 candidate pool of both trainers")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--trainers", default="ours,original", help="ours, original or both")
    p.add_argument("--out", default="runs/parity", help="output folder (finished runs are reused)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each a process of --threads threads)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the original")
    p.add_argument("--size", type=int, default=256, help="longer side of the evaluation images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of our config, applied to both trainers (e.g. data.crop_ratio=[0.75,1.3333])")
    p.add_argument("--json", default=None, help="write the figures as JSON")
    return p.parse_args(argv)


def main(argv=None):
    from insclr.bench.parity.runs import TRAINERS, Parity
    from insclr.bench.parity.stats import mean, table, welch_t
    from insclr.config import load_config
    from insclr.io import write_json

    args = parse_args(argv)
    trainers = [t for t in args.trainers.split(",") if t]
    if not trainers or any(t not in TRAINERS for t in trainers):
        print(f"error: --trainers={args.trainers!r}: expected ours, original or both", file=sys.stderr)
        return 2
    if "original" in trainers and not (args.original and (Path(args.original) / "tools" / "train_net.py").is_file()):
        print(f"error: --original={args.original!r}: not a checkout of justforforfor/insclr (tools/train_net.py "
              "missing); clone it, or pass --trainers ours", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    shards = Path(args.shards_root) / "gldv2"
    overrides = [*args.set] + ([f"train.steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, [*overrides, f"data.shards={shards}", f"data.pool={args.pool}", "train.device=cpu"])
    parity = Parity(cfg, args.config, overrides, args.gldv2, args.shards_root, args.original, args.out,
                    threads=args.threads, workers=args.workers, size=args.size)
    if "original" in trainers:
        parity.prepare_original()  # shared by its runs: made once, before they start
    runs = [(trainer, seed) for seed in seeds for trainer in trainers]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # the work is in subprocesses
        results = list(pool.map(lambda run: parity.one(*run), runs))
    rows = {}
    for (trainer, seed), result in zip(runs, results):
        rows.setdefault(seed, {})[trainer] = result
    sets = ("roxford5k", "rparis6k")
    print(f"\nmAP Medium % at longer side {args.size}, {cfg.train.steps} steps, {args.config} {' '.join(args.set)}")
    print(table(rows, sets, trainers))
    figures = {"seeds": rows, "config": args.config, "set": args.set, "steps": cfg.train.steps}
    if len(trainers) == 2:
        means = {tr: mean([mean([rows[s][tr][x] for s in seeds]) for x in sets]) for tr in trainers}
        figures["ratio"] = means["ours"] / means["original"] if means["original"] else float("nan")
        figures["t"] = {x: welch_t([rows[s]["ours"][x] for s in seeds], [rows[s]["original"][x] for s in seeds])[0]
                        for x in sets}
    if args.json:
        write_json(args.json, figures)
    return 0
