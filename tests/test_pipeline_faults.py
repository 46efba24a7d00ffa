"""The pipeline under faults (issue 12): a failed re-run keeps the complete stage, a signal stops
the running stage and its workers, a second pipeline is refused, a deleted output runs again,
and a bad recipe is one error naming the recipe file."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_pipeline import _recipe, _run  # noqa: E402

from insclr.io import output_lock  # noqa: E402
from insclr.pipeline import RecipeError, StageFailed, load_recipe, main, run_pipeline  # noqa: E402


def test_failed_rerun_keeps_the_complete_stage_and_resumes_in_its_new_folder(tmp_path, capsys):
    runs = tmp_path / "runs" / "toy"
    _run(tmp_path, _recipe(tmp_path))
    changed = _recipe(tmp_path, b_extra=["--changed"])
    assert main([str(changed), "--dry-run", "--nproc", "1", "--runs-root", str(tmp_path / "runs")]) == 0
    plan = capsys.readouterr().out
    assert "runs in b.next/; b/ is kept until it succeeds, then becomes b.previous/" in plan
    assert str(runs / "b.next") in plan  # the command writes there
    (tmp_path / "FAIL_b").touch()
    lines = []
    with pytest.raises(StageFailed):
        run_pipeline(changed, runs_root=tmp_path / "runs", nproc=1, log=lines.append)
    assert any(line.startswith("== b (command, config or inputs changed; runs in b.next/") for line in lines)
    # the complete run is untouched, so c still reads the b it was made from
    assert (runs / "b" / "b.txt").read_text() == "b(a())" and (runs / "b" / "done.json").is_file()
    assert (runs / "b.next" / "started.json").is_file() and not (runs / "b.next" / "done.json").exists()
    (tmp_path / "FAIL_b").unlink()
    actions, log = _run(tmp_path, changed)
    assert log == ["resume b", "start c"]  # the re-run resumed in b.next/ from its own progress file
    assert actions == {"a": "skip", "b": "resumed", "c": "ran"}
    assert json.loads((runs / "b" / "done.json").read_text())["argv"][-1] == "--changed"
    assert (runs / "b.previous" / "b.txt").read_text() == "b(a())"  # the run it replaced
    assert not (runs / "b.next").exists()
    _run(tmp_path, _recipe(tmp_path))  # and back: the older b.previous/ gives way to the newer one
    assert json.loads((runs / "b.previous" / "done.json").read_text())["argv"][-1] == "--changed"


def test_a_swap_cut_short_is_finished_on_the_next_start(tmp_path):
    recipe = _recipe(tmp_path)
    _run(tmp_path, recipe)
    runs = tmp_path / "runs" / "toy"
    (runs / "b").rename(runs / "b.next")  # killed between 'b -> b.previous' and 'b.next -> b'
    actions, log = _run(tmp_path, recipe)
    assert log == [] and set(actions.values()) == {"skip"}
    assert (runs / "b" / "b.txt").is_file() and not (runs / "b.next").exists()


def test_complete_stage_whose_output_was_deleted_runs_again(tmp_path):
    recipe = _recipe(tmp_path)
    _run(tmp_path, recipe)
    (tmp_path / "runs" / "toy" / "b" / "b.txt").unlink()
    steps = run_pipeline(recipe, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    assert steps[1].action == "run" and "its output" in steps[1].reason and "b.txt is missing" in steps[1].reason
    actions, log = _run(tmp_path, recipe)
    assert log == ["start b", "start c"] and (tmp_path / "runs" / "toy" / "b" / "b.txt").is_file()


def test_a_second_pipeline_on_the_same_runs_is_refused(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    with output_lock(tmp_path / "runs" / "toy"):
        assert main([str(recipe), "--nproc", "1", "--runs-root", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {(tmp_path / 'runs' / 'toy').resolve()} is being written by another process "
                          f"(pid {os.getpid()} on ")
    assert not (tmp_path / "runs.log").exists()  # nothing ran


# A stage launched like a training stage: torchrun and a worker that sleeps, its pid in a file.
SLEEPER = textwrap.dedent("""
    import os, pathlib, sys, time
    pathlib.Path(sys.argv[1], "worker.pid").write_text(str(os.getpid()))
    time.sleep(120)
""")


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped


def _children(pid):
    """Pids whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_pipeline_stops_torchrun_and_its_workers(tmp_path, signum):
    tool = tmp_path / "sleeper.py"
    tool.write_text(SLEEPER)
    argv = ["{python}", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(tool), "{out}"]
    recipe = tmp_path / "sleep.yaml"
    recipe.write_text(yaml.safe_dump({"stages": {"s": {"kind": "command", "argv": argv}}}))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    pipeline = subprocess.Popen([sys.executable, "-m", "insclr.pipeline", str(recipe), "--nproc", "1",
                                 "--runs-root", str(tmp_path / "runs")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "runs" / "sleep" / "s" / "worker.pid"
    deadline = time.time() + 90
    while not (pid_file.is_file() and pid_file.read_text()):
        assert pipeline.poll() is None and time.time() < deadline, pipeline.communicate()
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    (torchrun,) = _children(pipeline.pid)
    try:
        pipeline.send_signal(signum)  # to the pipeline alone, as `kill PID` does
        _, err = pipeline.communicate(timeout=90)
        assert pipeline.returncode == 128 + signum
        assert _gone(torchrun) and _gone(worker)  # stopped before the pipeline exited, not left behind
    finally:
        for pid in (worker, torchrun, pipeline.pid):  # what a failure would leave behind
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert f"interrupted ({signal.Signals(signum).name})" in err and "Traceback" not in err.split("interrupted")[-1]
    steps = run_pipeline(recipe, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    assert steps[0].action == "resume"


def _bad_recipe(tmp_path, stages):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


@pytest.mark.parametrize("stages, message", [
    ({"a": {"kind": ["command"], "argv": ["true"]}}, r"stages.a.kind: \['command'\] is not one of"),
    ({"a": {"kind": "command", "argv": ["true"], "inputs": 5}}, "stages.a.inputs must be a list of stage names"),
    ({"e": {"kind": "evaluate", "model": "m.pt", "data": [1]}}, "stages.e.data must name the evaluation sets"),
    ({"f": {"kind": "features", "shards": "s", "model": "random", "args": {"size": {"x": 1}}}},
     r"stages.f.args.size must be a value or a list of values"),
    ({"f": {"kind": "features", "shards": "s", "model": "random", "args": {"a": 1}}},
     r"stages.f.args: '--a 1' is not an option of python -m insclr.features"),  # not an abbreviation
    ({"e": {"kind": "evaluate", "model": "m.pt", "data": "roxford5k", "args": {"shards-root": ["x"]}}}, None),
    ({"s1.next": {"kind": "command", "argv": ["true"]}}, r"stage name 's1.next' may not end in .next"),
    ({"t": {"kind": "train", "config": "c.yaml", "pool": "p.npz", "max_restarts": -1}},
     r"stages.t.max_restarts must be an integer >= 0"),
])
def test_recipe_errors_name_the_recipe_file(tmp_path, stages, message):
    path = _bad_recipe(tmp_path, stages)
    if message is None:  # accepted, and planned without a crash
        run_pipeline(path, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
        return
    with pytest.raises(RecipeError, match=message) as info:
        run_pipeline(path, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    assert str(info.value).startswith(str(path))


def test_recipe_yaml_error_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages:\n  a: {kind: command, argv: [true]\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:3:1: not valid YAML: ") and "\n" not in str(info.value)


def test_train_stage_max_restarts_is_configurable(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"base: {Path('configs/demo.yaml').resolve()}\n")
    stages = {"s1": {"kind": "train", "config": str(config), "pool": "p.npz", "max_restarts": 0}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    steps = run_pipeline(path, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    assert "--max-restarts=0" in steps[0].argv  # the stage's own value wins over --max-restarts
    del stages["s1"]["max_restarts"]
    path.write_text(yaml.safe_dump({"stages": stages}))
    steps = run_pipeline(path, runs_root=tmp_path / "runs", nproc=1, dry_run=True, max_restarts=5,
                         log=lambda *a: None)
    assert "--max-restarts=5" in steps[0].argv


def test_a_training_run_started_by_hand_with_the_stage_command_is_resumed_not_redone(tmp_path):
    """docs/pipeline.md, multi-node: torchrun on every node with the stage's command, then the pipeline."""
    from insclr.config import save_config
    from insclr.pipeline.commands import resolved_train_config

    config = tmp_path / "cfg.yaml"
    config.write_text(f"base: {Path('configs/demo.yaml').resolve()}\n")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": {"s1": {"kind": "train", "config": str(config), "pool": "p.npz"}}}))
    (step,) = run_pipeline(path, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    core = step.argv[step.argv.index("-m", 3):]
    folder = tmp_path / "runs" / "r" / "s1"
    save_config(resolved_train_config(core), folder / "config.yaml")  # what the trainer writes first
    (step,) = run_pipeline(path, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    assert step.action == "resume" and step.folder == folder and "by hand" in step.reason
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("steps:", "steps: 1 #"))
    (step,) = run_pipeline(path, runs_root=tmp_path / "runs", nproc=1, dry_run=True, log=lambda *a: None)
    assert step.action == "run" and step.folder == tmp_path / "runs" / "r" / "s1.next"  # another config: kept
    assert f"train.out={step.folder}" in step.argv and "train.resume=auto" in step.argv  # resumes there
