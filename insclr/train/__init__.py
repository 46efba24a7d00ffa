"""Training: `torchrun --nproc_per_node G -m insclr.train CONFIG [section.key=value ...]`.

Also `python -m insclr.train CONFIG` (world size 1) and `python -m insclr.train --print-config CONFIG`.
Writes OUT/config.yaml (resolved), OUT/metrics.jsonl, OUT/ckpt/step-*/ and OUT/model.pt (train.out = OUT).
"""


def parse_args(argv):
    import argparse

    from insclr.args import Parser

    p = Parser(prog="python -m insclr.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (may name a `base:` file it extends)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 train.out=runs/x")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def main(argv=None):
    import os
    import sys

    from insclr.config import ConfigError, config_warnings, dump_config, load_config
    from insclr.io import output_lock, print_error

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print_error(e)
        return 2
    if int(os.environ.get("RANK", "0") or 0) == 0:
        for warning in config_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from insclr import dist
    from insclr.train.loop import train

    try:
        with output_lock(cfg.train.out):  # rank 0 holds it for the whole job
            path = train(cfg)
    except (OSError, ValueError, FloatingPointError) as e:
        # Bad inputs (shards, pool, model file, checkpoint), a run stopped by non-finite losses, a
        # full disk and a train.out that another run is writing raise these with a message naming
        # the key and file: say it (print_error adds the traceback when raised outside insclr).
        print_error(e)
        return 2
    finally:
        dist.shutdown()
    if dist.is_main():
        print(f"wrote {path}")
    return 0
