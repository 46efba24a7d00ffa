"""`make demo` / `python -m insclr.demo`: the whole job on the built-in synthetic dataset, on the CPU.

1. writes the synthetic datasets (`insclr.synth --scale small`) unless an identical set is there;
2. shards the training set and the two revisitop-style evaluation sets into shards/demo/<set>;
3. runs pipelines/demo.yaml (features -> pool -> evaluation of the starting model -> base stage
   (bank v1) -> evaluation -> features -> pool -> impr stage (in-batch selection + bank v2) ->
   evaluation), skipping the stages that are already complete;
4. prints the mAP after every stage, writes runs/demo/summary.json ({"map_start": {...},
   "map_trained": {...} (the last stage), "stages": [{"stage", "model", "map"}, ...]}, Medium and
   Hard mAP in percent) and a PNG of the training curves, and names the retrieval pictures.

Every step is resumable: run it again after an interruption and it picks up where it stopped.
"""

import json
import shutil
import sys
import time
from pathlib import Path

EVAL_SETS = ("roxford5k", "rparis6k")
SHARDED = ("gldv2",) + EVAL_SETS


def synth_is_current(root, seed, scale):
    """True when `root` holds a complete synthetic set of this generator version, seed and scale."""
    from insclr.synth import VERSION

    meta = Path(root) / "synth.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return (info.get("version") == VERSION and info.get("seed") == seed and info.get("scale") == scale
            and all(name in info.get("datasets", {}) for name in SHARDED))


def prepare_data(data_root, shards_root, seed, log=print):
    """Synthetic datasets and their shards; stale shards are removed when the data is regenerated."""
    from insclr.shard import shard_dataset
    from insclr.synth import generate

    if not synth_is_current(data_root, seed, "small"):
        log(f"== writing the synthetic datasets to {data_root} (scale small, seed {seed})")
        for name in SHARDED:  # shards of older synthetic data must not be resumed from
            shutil.rmtree(Path(shards_root) / name, ignore_errors=True)
        generate(data_root, seed=seed, scale="small", datasets=list(SHARDED) + ["instre", "revisitop1m"])
    else:
        log(f"== synthetic datasets in {data_root} are up to date")
    for name in SHARDED:
        out = Path(shards_root) / name
        if (out / "manifest.json").is_file():
            continue
        log(f"== sharding {name} -> {out}")
        shard_dataset(name, Path(data_root) / name, out, workers=2)


def evaluate_stages(recipe):
    """Names of the recipe's evaluation stages in execution order (first: the starting model)."""
    return [name for name, stage in recipe.stages.items() if stage.kind == "evaluate"]


def read_eval(path):
    with open(path) as f:
        return json.load(f)["results"]


def map_summary(results):
    """{set: {"medium": %, "hard": %}} of an evaluation's results."""
    return {name: {"medium": round(100 * r["mapM"], 2), "hard": round(100 * r["mapH"], 2)}
            for name, r in results.items() if "mapM" in r}


def training_curves(recipe, runs_dir, out_png):
    """PNG of the training curves (insclr.plot.training_plot) over the recipe's training stages
    chained (each stage's steps after the previous one's), with mAP at each evaluation stage."""
    from insclr.plot import training_plot

    records, maps = [], {}
    offset = 0
    for name, stage in recipe.stages.items():
        if stage.kind == "train":
            metrics = Path(runs_dir) / name / "metrics.jsonl"
            last = 0
            for line in metrics.read_text().splitlines() if metrics.is_file() else []:
                rec = json.loads(line)
                if "loss" not in rec:
                    continue
                last = rec["step"]
                records.append({**rec, "step": offset + last})
            offset += last
        elif stage.kind == "evaluate":
            result = Path(runs_dir) / name / "eval.json"
            if result.is_file():
                for dataset, values in map_summary(read_eval(result)).items():
                    maps.setdefault(f"{dataset} Medium", []).append((offset, values["medium"]))
                    maps.setdefault(f"{dataset} Hard", []).append((offset, values["hard"]))
    training_plot(records, maps, out_png)
    return out_png


def stage_table(recipe, runs_dir, evals):
    """[{"stage": evaluation stage, "model": what it evaluated, "map": {set: {medium, hard}}}] in order."""
    return [{"stage": name, "model": str(recipe.stages[name].spec.get("model")),
             "map": map_summary(read_eval(runs_dir / name / "eval.json"))} for name in evals]


def print_stages(stages, log=print):
    sets = list(stages[0]["map"]) if stages else []
    log("\n" + f"{'after':<12}" + "".join(f" {s + ' M':>14} {s + ' H':>14}" for s in sets))
    for row in stages:
        maps = row["map"]
        log(f"{row['model']:<12}" + "".join(f" {maps.get(s, {}).get('medium', float('nan')):>14.2f} "
                                             f"{maps.get(s, {}).get('hard', float('nan')):>14.2f}" for s in sets))


def main(argv=None):
    from insclr.args import Parser, existing_file, nonnegative_int, output_dir

    p = Parser(prog="python -m insclr.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="datasets/synth", type=output_dir, help="synthetic datasets folder")
    p.add_argument("--shards", default="shards/demo", type=output_dir, help="shard folder of the demo sets")
    p.add_argument("--recipe", default="pipelines/demo.yaml", type=existing_file)
    p.add_argument("--runs-root", default="runs", type=output_dir)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    args = p.parse_args(argv)

    from insclr.io import write_json
    from insclr.pipeline import load_recipe, run_pipeline

    start = time.time()
    prepare_data(args.data, args.shards, args.seed)
    recipe = load_recipe(args.recipe)
    run_pipeline(args.recipe, runs_root=args.runs_root, nproc=1)
    runs_dir = Path(args.runs_root) / recipe.name
    evals = evaluate_stages(recipe)
    if len(evals) < 2:
        print(f"error: {args.recipe} needs an evaluation of the starting and of the trained model", file=sys.stderr)
        return 2
    stages = stage_table(recipe, runs_dir, evals)
    map_start, map_trained = stages[0]["map"], stages[-1]["map"]
    curves = training_curves(recipe, runs_dir, runs_dir / "training_curves.png")
    pictures = sorted(str(p) for p in (runs_dir / evals[-1]).glob("*.png"))
    write_json(runs_dir / "summary.json", {
        "map_start": map_start, "map_trained": map_trained,
        "start_stage": evals[0], "trained_stage": evals[-1], "stages": stages,
        "training_curves": str(curves), "pictures": pictures, "seconds": round(time.time() - start, 1)})
    print_stages(stages)
    print(f"\nsummary: {runs_dir / 'summary.json'}\ntraining curves: {curves}")
    for picture in pictures:
        print(f"retrieval picture: {picture}")
    print(f"demo finished in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
