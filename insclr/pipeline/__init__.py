"""`python -m insclr.pipeline pipelines/NAME.yaml`: run a recipe's stages in order, skipping finished ones.

    python -m insclr.pipeline pipelines/gldv2.yaml [--from STAGE] [--only STAGE] [--dry-run]
                              [--nproc G] [--runs-root runs] [--until STAGE] [--max-restarts N]

Stages are the project's own CLIs run as subprocesses (features, pool, torchrun -m insclr.train,
evaluate); each writes into runs/<recipe>/<stage>/ and is complete once its done.json is there
(see insclr.pipeline.runner for the rules). One pipeline at a time writes runs/<recipe>/ (a
lock refuses a second one); a signal to the pipeline stops the running stage first (see
insclr.pipeline.process). Recipes are described in docs/pipeline.md.
"""

import signal
import sys
import time

from insclr.io import DiskFull, OutputLocked, output_lock, print_error
from insclr.pipeline.commands import StagePaths, display
from insclr.pipeline.process import Interrupted
from insclr.pipeline.recipe import KINDS, Recipe, RecipeError, Stage, load_recipe
from insclr.pipeline.runner import StageFailed, format_result, plan, previous, run_stage, swap_in

__all__ = ["main", "run_pipeline", "load_recipe", "plan", "Recipe", "Stage", "RecipeError", "StageFailed",
           "KINDS"]

COLUMNS = ["stage", "kind", "action", "seconds", "result"]


def default_nproc():
    """Number of GPUs, or 1 on the CPU."""
    import torch

    return max(torch.cuda.device_count(), 1)


def _rows(steps):
    return [{"stage": s.name, "kind": s.kind, "action": s.action,
             "seconds": "" if s.seconds is None else round(s.seconds, 1), "result": s.result} for s in steps]


def run_pipeline(recipe_path, runs_root="runs", nproc=None, from_stage=None, only=None, until=None,
                 dry_run=False, max_restarts=2, log=print):
    """Run (or with dry_run, only plan) a recipe; returns the list of Steps with times and results.

    max_restarts: how often torchrun starts a training stage again after a rank failed.
    """
    recipe = load_recipe(recipe_path)
    paths = StagePaths(recipe, runs_root)
    nproc = nproc or default_nproc()
    options = {"from_stage": from_stage, "only": only, "until": until, "max_restarts": max_restarts}
    steps = plan(recipe, paths, nproc, **options)  # checks the recipe before anything is written
    if dry_run:
        log(f"plan for {recipe.path} (outputs under {paths.root}/, {nproc} process(es) per multi-process stage):")
        for s in steps:
            log(f"  {s.name:<16} {s.kind:<9} {s.action:<7} {s.reason}")
            if s.action not in ("not selected", "skip"):
                log(f"      {display(s.argv, s.env)}")
        return steps
    with output_lock(paths.root):
        if [name for name in recipe.stages if swap_in(paths, name)]:  # swaps that a kill cut short
            steps = plan(recipe, paths, nproc, **options)
        return _run(recipe, paths, steps, log)


def _run(recipe, paths, steps, log):
    from insclr.io import print_table, write_json

    start = time.time()
    try:
        for step in steps:
            if step.action in ("run", "forced", "resume"):
                step.seconds = run_stage(recipe, paths, step, log=log)
                step.action = {"forced": "ran", "resume": "resumed"}.get(step.action, "ran")
            previous(paths, step)
    finally:
        log("")
        print_table(_rows(steps), COLUMNS, title=f"{recipe.name}: {time.time() - start:.0f} s")
        write_json(paths.root / "pipeline.json", {"recipe": str(recipe.path), "rows": _rows(steps)})
    return steps


def main(argv=None):
    from insclr.args import Parser, nonnegative_int, output_dir, positive_int

    p = Parser(prog="python -m insclr.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML, e.g. pipelines/gldv2.yaml")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="run STAGE and every stage after it again")
    p.add_argument("--only", metavar="STAGE", help="run only STAGE (again); its inputs must be complete")
    p.add_argument("--until", metavar="STAGE", help="stop after STAGE (e.g. skip INSTRE's optional impr stage)")
    p.add_argument("--dry-run", action="store_true", help="print the plan: what would run and why, with commands")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="processes for training (and multi-process features): default the number of GPUs, or 1")
    p.add_argument("--runs-root", default="runs", type=output_dir,
                   help="stage outputs go to RUNS_ROOT/<recipe>/<stage>/")
    p.add_argument("--max-restarts", type=nonnegative_int, default=2, metavar="N",
                   help="torchrun starts a training stage again up to N times after a rank fails (it resumes "
                        "from its latest checkpoint; a stage's own max_restarts: wins; default 2)")
    args = p.parse_args(argv)
    if args.from_stage and args.only:
        p.error("--from and --only cannot be used together")
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be at least 1")
    if args.max_restarts < 0:
        p.error("--max-restarts must be at least 0")
    try:
        run_pipeline(args.recipe, runs_root=args.runs_root, nproc=args.nproc, from_stage=args.from_stage,
                     only=args.only, until=args.until, dry_run=args.dry_run, max_restarts=args.max_restarts)
    except (RecipeError, StageFailed, OutputLocked, DiskFull) as e:
        print_error(e)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}): the running stage has stopped; run the same "
              f"command again to resume from the first incomplete stage", file=sys.stderr)
        return 128 + signum
    return 0
