"""The stage runner: skip / rerun / resume logic with tiny `command` stages, recipe validation,
and the command lines of the real stage kinds."""

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from insclr.pipeline import RecipeError, StageFailed, load_recipe, main, run_pipeline

# A fake stage: logs each start to LOG, fails half-way while FAIL_<name> exists (leaving a
# progress file, like a training checkpoint), and on the next start resumes from that file.
TOOL = textwrap.dedent("""
    import pathlib, sys
    out, name, extra = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    work = pathlib.Path(__file__).parent
    progress = out / "progress.txt"
    with open(work / "runs.log", "a") as log:
        log.write(("resume " if progress.exists() else "start ") + name + "\\n")
    progress.write_text("half")
    if (work / ("FAIL_" + name)).exists():
        sys.exit(3)
    inputs = [(pathlib.Path(p) / (pathlib.Path(p).name + ".txt")).read_text() for p in extra if p[:2] != "--"]
    (out / (name + ".txt")).write_text(name + "(" + ",".join(inputs) + ")")
""")


def _recipe(tmp_path, b_extra=(), name="toy"):
    tool = tmp_path / "tool.py"
    tool.write_text(TOOL)
    stages = {
        "a": {"kind": "command", "argv": ["{python}", str(tool), "{out}", "a"], "output": "a.txt"},
        "b": {"kind": "command", "argv": ["{python}", str(tool), "{out}", "b", "{dir:a}", *b_extra],
              "output": "b.txt"},
        "c": {"kind": "command", "argv": ["{python}", str(tool), "{out}", "c", "{dir:b}"], "output": "c.txt"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return path


def _run(tmp_path, recipe, **kw):
    (tmp_path / "runs.log").unlink(missing_ok=True)
    steps = run_pipeline(recipe, runs_root=tmp_path / "runs", nproc=1, log=lambda *a: None, **kw)
    log = (tmp_path / "runs.log").read_text().split("\n")[:-1] if (tmp_path / "runs.log").exists() else []
    return {s.name: s.action for s in steps}, log


def test_runs_in_order_then_skips_complete_stages(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    actions, log = _run(tmp_path, recipe)
    assert log == ["start a", "start b", "start c"] and set(actions.values()) == {"ran"}
    out = tmp_path / "runs" / "toy"
    assert (out / "c" / "c.txt").read_text() == "c(b(a()))"
    assert all((out / s / "done.json").is_file() for s in "abc")
    assert "toy:" in capsys.readouterr().out  # the summary table
    actions, log = _run(tmp_path, recipe)
    assert log == [] and set(actions.values()) == {"skip"}
    assert (out / "pipeline.json").is_file()


def test_changed_config_reruns_that_stage_and_later_ones(tmp_path):
    _run(tmp_path, _recipe(tmp_path))
    actions, log = _run(tmp_path, _recipe(tmp_path, b_extra=["--changed"]))
    # b's own folder was cleared (not resumed) because its config changed
    assert log == ["start b", "start c"]
    assert actions == {"a": "skip", "b": "ran", "c": "ran"}


def test_interrupted_stage_resumes_and_later_stages_run(tmp_path):
    recipe = _recipe(tmp_path)
    (tmp_path / "FAIL_b").touch()
    with pytest.raises(StageFailed, match="stage b failed with exit code 3"):
        _run(tmp_path, recipe)
    b = tmp_path / "runs" / "toy" / "b"
    assert (b / "started.json").is_file() and not (b / "done.json").exists()
    (tmp_path / "FAIL_b").unlink()
    actions, log = _run(tmp_path, recipe)
    assert log == ["resume b", "start c"]
    assert actions == {"a": "skip", "b": "resumed", "c": "ran"}


def test_only_and_from(tmp_path):
    recipe = _recipe(tmp_path)
    _run(tmp_path, recipe)
    actions, log = _run(tmp_path, recipe, only="b")
    assert log == ["start b"] and actions == {"a": "not selected", "b": "ran", "c": "not selected"}
    actions, log = _run(tmp_path, recipe)  # c read the old b: it is stale now
    assert log == ["start c"]
    actions, log = _run(tmp_path, recipe, from_stage="b")
    assert log == ["start b", "start c"] and actions["a"] == "skip"
    actions, log = _run(tmp_path, recipe, until="a", from_stage="a")
    assert log == ["start a"] and actions["c"] == "not selected"


def test_only_needs_complete_inputs(tmp_path):
    with pytest.raises(RecipeError, match="stage c needs b, which is not complete"):
        _run(tmp_path, _recipe(tmp_path), only="c")


def test_dry_run_prints_plan_and_runs_nothing(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main([str(recipe), "--dry-run", "--nproc", "1", "--runs-root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "not run yet" in out and "tool.py" in out
    assert not (tmp_path / "runs.log").exists() and not (tmp_path / "runs" / "toy" / "a").exists()


@pytest.mark.parametrize("stages, message", [
    ({"a": {"kind": "command", "argv": ["true"], "colour": 1}}, r"stages.a: unknown key\(s\) \['colour'\]"),
    ({"a": {"kind": "bake"}}, r"stages.a.kind: 'bake' is not one of"),
    ({"a": {"kind": "command", "argv": ["true"], "after": ["zz"]}}, "unknown stage 'zz'"),
    ({"a": {"kind": "command", "argv": ["{dir:b}"]}, "b": {"kind": "command", "argv": ["{dir:a}"]}},
     "cycle: a -> b -> a"),
    ({"t": {"kind": "command", "argv": ["x"]}, "p": {"kind": "pool", "features": "t2"}},
     r"stages.p.features: 't2' is neither a stage"),
    ({"f": {"kind": "features", "shards": "s", "model": "m"}, "e": {"kind": "evaluate", "model": "f", "data": ["x"]}},
     "stages.e.model: stage 'f' is a features stage"),
    ({"t": {"kind": "train", "pool": "p.npz"}}, r"stages.t: missing key\(s\) \['config'\]"),
])
def test_recipe_validation_names_file_and_key(tmp_path, stages, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_cli_reports_bad_recipe(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("stages: {}\nextra: 1\n")
    assert main([str(path), "--nproc", "1"]) == 1
    assert "unknown top-level key(s) ['extra']" in capsys.readouterr().err


def test_train_stage_command_and_config_hash(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("base: {}\ntrain:\n  steps: 5\n".format(Path("configs/demo.yaml").resolve()))
    recipe = tmp_path / "r.yaml"
    stages = {"feat": {"kind": "features", "shards": "shards/x", "model": "random",
                       "args": {"size": 64, "scales": [1, 0.5], "arch": "resnet18"}},
              "pool": {"kind": "pool", "features": "feat", "args": {"k": 10}},
              "s1": {"kind": "train", "config": str(config), "pool": "pool", "init": "random",
                     "overrides": ["train.batch=4"]},
              "ev": {"kind": "evaluate", "model": "s1", "data": ["roxford5k"]}}
    recipe.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    steps = run_pipeline(recipe, runs_root=tmp_path / "runs", nproc=2, dry_run=True, log=lambda *a: None)
    argv = {s.name: s.argv for s in steps}
    run = tmp_path / "runs" / "r"
    assert argv["feat"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv["feat"][-6:] == ["--size", "64", "--scales", "1,0.5", "--arch", "resnet18"]
    assert argv["pool"] == [sys.executable, "-m", "insclr.pool", "--features", str(run / "feat" / "features.npy"),
                            "--out", str(run / "pool" / "pool.npz"), "--k", "10"]
    assert argv["s1"][5] == "--max-restarts=2"  # torchrun restarts a failed rank's job (it resumes)
    assert argv["s1"][6:] == ["-m", "insclr.train", str(config), f"train.out={run / 's1'}",
                              f"data.pool={run / 'pool' / 'pool.npz'}", "model.init=random",
                              "train.resume=auto", "train.batch=4"]
    assert argv["ev"][3:6] == ["--model", str(run / "s1" / "model.pt"), "--data"]
    # an unknown key in the training config is a recipe error naming the stage
    stages["s1"]["overrides"] = ["train.bogus=1"]
    recipe.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    with pytest.raises(RecipeError, match="stages.s1.config: .*unknown key 'train.bogus'"):
        run_pipeline(recipe, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    # a misspelt or ill-typed stage option is found by the stage CLI's own parser before anything runs
    stages["s1"]["overrides"] = []
    for args, message in (({"sise": 64}, "'--sise 64' is not an option of python -m insclr.features"),
                          ({"size": "big"}, "argument --size: expected an integer, got 'big'")):
        stages["feat"]["args"] = args
        recipe.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
        with pytest.raises(RecipeError, match=f"stages.feat.args: {message}"):
            run_pipeline(recipe, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)


@pytest.mark.parametrize("name", ["gldv2", "instre", "demo"])
def test_shipped_recipes_are_valid(name, tmp_path):
    steps = run_pipeline(f"pipelines/{name}.yaml", runs_root=tmp_path, nproc=1, dry_run=True,
                         log=lambda *a: None)
    kinds = [s.kind for s in steps]
    assert kinds[0] == "features" and "train" in kinds and kinds[-1] == "evaluate"


def _reduced_demo(tmp_path, shards_dir):
    """pipelines/demo.yaml on the tiny synthetic shards, 64 px, two training steps per stage."""
    recipe = yaml.safe_load(Path("pipelines/demo.yaml").read_text())
    stages, gld = recipe["stages"], str(shards_dir / "gldv2")
    for name in ("s0_features", "base_features"):
        stages[name]["shards"] = gld
        stages[name]["args"].update(size=64)
    for name in ("s0_pool", "base_pool"):
        stages[name]["args"].update(k=20, shards=gld)
    short = ["train.steps=2", "train.milestones=[1]", "train.batch=4", "data.size=64", "train.checkpoint_every=1"]
    stages["base"]["shards"] = gld
    stages["base"]["overrides"] = short + ["memory.start_step=0", "memory.get_step=1", "memory.potential_positive=5"]
    stages["impr"]["shards"] = gld
    stages["impr"]["overrides"] = short + ["noaug.size=64", "memory.get_size=16"]
    for name in ("eval_base", "eval_impr"):
        stages[name]["data"] = ["roxford5k"]
        stages[name]["args"] = {"shards-root": str(shards_dir)}
    del stages["eval_start"]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_reduced_demo_pipeline_runs_real_stages(tmp_path, shards_dir):
    """features -> pool -> base (2 steps) -> evaluate -> features -> pool -> impr (selection + bank v2, 2 steps)
    -> evaluate through the real CLIs, then a rerun that skips them all."""
    recipe = _reduced_demo(tmp_path, shards_dir)
    runs = tmp_path / "runs"
    steps = run_pipeline(recipe, runs_root=runs, nproc=1)
    assert all(s.action == "ran" for s in steps)
    assert (runs / "demo" / "base" / "model.pt").is_file() and (runs / "demo" / "impr" / "model.pt").is_file()
    assert (runs / "demo" / "s0_pool" / "pool.npz").is_file() and (runs / "demo" / "base_pool" / "pool.npz").is_file()
    assert "roxford5k M" in steps[-1].result and "roxford5k H" in steps[-1].result  # from eval.json
    again = run_pipeline(recipe, runs_root=runs, nproc=1)
    assert [s.action for s in again] == ["skip"] * len(steps)
