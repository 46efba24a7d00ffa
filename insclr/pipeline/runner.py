"""Deciding which stages run, running them as subprocesses, and the completion records.

Per stage folder runs/<recipe>/<stage>/:
- `started.json` {hash, argv}: written before the stage's command starts. If the run is cut
  short, the next run with the same hash resumes in the same folder (training: from its
  checkpoint, train.resume=auto).
- `done.json` {hash, argv, inputs, seconds, finished, result}: written LAST, after the command
  succeeded and its output exists. A stage is complete when its done.json holds the hash that
  the stage has now and its output is there. The hash covers the stage's inputs' done.json
  files, so a stage that runs again makes every stage that reads it run again.

Nothing a stage wrote is deleted to run it again: when its folder holds outputs (a complete run
of another config, an interrupted one of another config), the new run goes to <stage>.next/
(and resumes there if it is cut short); once it is complete, <stage>/ becomes <stage>.previous/
(replacing an older one) and <stage>.next/ becomes <stage>/. A failed re-run leaves <stage>/
as it was, so the stages after it still read the outputs they were made from.
"""

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from insclr.config import ConfigError
from insclr.io import read_json, write_json
from insclr.pipeline.commands import (check_args, core_argv, display, launch_env, launcher,
                                      resolved_train_config, stage_hash)
from insclr.pipeline.process import run_command
from insclr.pipeline.recipe import RecipeError


class StageFailed(RuntimeError):
    """A stage command that exited with an error or did not write its output."""


@dataclass
class Step:
    name: str
    kind: str
    action: str                    # run | resume | skip | forced | not selected
    reason: str
    argv: list = field(default_factory=list)
    env: dict = field(default_factory=dict)  # added to the runner's environment for the command
    folder: Path = None            # where it runs: the stage's folder, or <stage>.next/ to replace it
    seconds: float = None
    result: str = ""


def fingerprint(paths, name):
    """sha256 of a stage's done.json (None when the stage is not complete)."""
    done = paths.dir(name) / "done.json"
    return hashlib.sha256(done.read_bytes()).hexdigest() if done.is_file() else None


def _hash(stage, paths, core):
    try:
        check_args(stage, core)
    except ValueError as e:
        raise RecipeError(f"{paths.recipe.path}: stages.{stage.name}.args: {e}") from None
    try:
        return stage_hash(stage, paths, core, {i: fingerprint(paths, i) for i in stage.inputs})
    except ConfigError as e:
        raise RecipeError(f"{paths.recipe.path}: stages.{stage.name}.config: {e}") from None


def _record(folder, name):
    path = folder / name
    return read_json(path) if path.is_file() else None


def _holds_outputs(folder):
    """Whether a stage folder holds anything besides a started.json (which a new run may replace)."""
    return folder.is_dir() and any(p.name != "started.json" for p in folder.iterdir())


def _status(stage, paths, current):
    """(action, reason, folder to run in) from the records on disk, assuming the inputs stay as they are."""
    folder, new = paths.dir(stage.name), paths.new_dir(stage.name)
    done = _record(folder, "done.json")
    if done and done.get("hash") == current:
        if paths.output(stage.name).exists():
            return "skip", "complete", folder
        why = f"complete, but its output {paths.output(stage.name)} is missing"
    else:
        why = "config or inputs changed" if done else None
    started = _record(new, "started.json")
    if started and started.get("hash") == current:
        return "resume", "interrupted run", new
    started = _record(folder, "started.json")
    if not done and started and started.get("hash") == current:
        return "resume", "interrupted run", folder
    if not done and not started and _trained_by_hand(stage, paths, folder):
        return "resume", "run started by hand with this stage's config", folder
    if why is None:
        why = "config or inputs changed" if started else "not run yet"
    return "run", why, fresh_folder(paths, stage.name)


def _trained_by_hand(stage, paths, folder):
    """Whether `folder` holds a training run launched outside the pipeline with this stage's exact
    command (the multi-node recipe of docs/pipeline.md): its config.yaml is the stage's config."""
    saved = folder / "config.yaml"
    if stage.kind != "train" or not saved.is_file():
        return False
    from insclr.config import dump_config

    return saved.read_text() == dump_config(resolved_train_config(core_argv(stage, paths)))


def fresh_folder(paths, name):
    """Where a new run of stage `name` goes: its folder if that holds no outputs, else <name>.next/."""
    return paths.new_dir(name) if _holds_outputs(paths.dir(name)) else paths.dir(name)


def where(paths, step):
    """The plan's note on a step that runs in <stage>.next/ ('' for one that runs in its folder)."""
    if step.folder is None or step.folder == paths.dir(step.name):
        return ""
    return (f"in {step.folder.name}/; {step.name}/ is kept until it succeeds, "
            f"then becomes {paths.old_dir(step.name).name}/")


def plan(recipe, paths, nproc, from_stage=None, only=None, until=None, max_restarts=0):
    """One Step per stage, in order: what a run would do, why, where and with which command."""
    names = list(recipe.stages)
    for flag, value in (("--from", from_stage), ("--only", only), ("--until", until)):
        if value is not None and value not in recipe.stages:
            raise RecipeError(f"{recipe.path}: {flag} {value!r} is not a stage (stages: {names})")
    start = names.index(from_stage) if from_stage else 0
    stop = names.index(until) if until else len(names) - 1
    steps, rerunning = [], set()
    for i, (name, stage) in enumerate(recipe.stages.items()):
        core = core_argv(stage, paths)
        current = _hash(stage, paths, core)  # also checks a train stage's config, whatever runs
        step = Step(name, stage.kind, "", "")
        if only is not None and name != only:
            step.action, step.reason = "not selected", "--only"
        elif i > stop:
            step.action, step.reason = "not selected", "after --until"
        elif only == name or (from_stage and i >= start):
            step.action, step.reason = "forced", "--only" if only else "--from"
            step.folder = fresh_folder(paths, name)
        elif from_stage and i < start:
            step.action, step.reason = "skip", "before --from"
        else:
            changed = [n for n in stage.inputs if n in rerunning]
            if changed:
                step.action, step.reason = "run", f"input {changed[0]} runs before it"
                step.folder = fresh_folder(paths, name)
            else:
                step.action, step.reason, step.folder = _status(stage, paths, current)
        if step.action in ("run", "forced", "resume"):
            rerunning.add(name)
            step.reason = "; runs ".join(filter(None, [step.reason, where(paths, step)]))
            core = core_argv(stage, paths, out=step.folder)
        step.argv, step.env = launcher(stage, nproc, max_restarts) + core, launch_env(stage)
        steps.append(step)
    _check_selected_inputs(recipe, paths, steps)
    return steps


def _check_selected_inputs(recipe, paths, steps):
    """Stages left out by --from/--only must already be complete when a selected stage reads them."""
    running = {s.name for s in steps if s.action in ("run", "forced", "resume")}
    for step in steps:
        if step.name not in running:
            continue
        for name in recipe.stages[step.name].inputs:
            if name not in running and fingerprint(paths, name) is None:
                raise RecipeError(f"{recipe.path}: stage {step.name} needs {name}, which is not complete "
                                  f"and not selected to run (run without --only/--from first)")


def _prepare(paths, step, current):
    """Make the step's folder ready: kept as it is to resume, emptied for a new run in <stage>.next/
    (an interrupted run of another config, or of a forced rerun), then record the start."""
    folder = step.folder
    if step.action != "resume" and folder == paths.new_dir(step.name) and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "started.json", {"hash": current, "argv": step.argv, "started": time.time()})


def swap_in(paths, name):
    """Make a complete <name>.next/ the stage's folder; the folder it replaces becomes <name>.previous/.

    Each step can be redone, so a run cut short in the middle of it finishes it on the next start.
    Returns whether there was one to put in place.
    """
    folder, new, old = paths.dir(name), paths.new_dir(name), paths.old_dir(name)
    if not (new / "done.json").is_file():
        return False
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    new.rename(folder)
    return True


def run_stage(recipe, paths, step, log=print):
    """Run one stage's command, write its done.json and put its folder in place; returns seconds spent."""
    stage = recipe.stages[step.name]
    current = _hash(stage, paths, core_argv(stage, paths))
    _prepare(paths, step, current)
    log(f"== {step.name} ({step.kind}, {step.reason}): {display(step.argv, step.env)}")
    sys.stdout.flush()  # our line before the child's output
    start = time.time()
    try:
        code = run_command(step.argv, f"stage {step.name}", env={**os.environ, **step.env})
    except OSError as e:
        raise StageFailed(f"stage {step.name}: cannot start {step.argv[0]!r}: {e.strerror}") from None
    seconds = time.time() - start
    if code != 0:
        raise StageFailed(f"stage {step.name} failed with exit code {code} after {seconds:.0f} s: "
                          f"{display(step.argv, step.env)} (rerun the pipeline to resume it)")
    output = step.folder / stage.output if stage.output else step.folder
    if stage.output and not output.exists():
        raise StageFailed(f"stage {step.name} finished but did not write {output}")
    result = read_result(stage, output)
    write_json(step.folder / "done.json", {"hash": current, "argv": step.argv, "seconds": round(seconds, 3),
                                           "inputs": {i: fingerprint(paths, i) for i in stage.inputs},
                                           "finished": time.time(), "result": result})
    swap_in(paths, step.name)
    return seconds


def read_result(stage, output):
    """An evaluation's headline mAP in percent, {"roxford5k M": 61.2, "roxford5k H": 35.0, ...}; else {}.

    Reads insclr.evaluate's JSON ({"results": {set: {"mapM", "mapH" | "map" | "map100_*"}}}).
    """
    if stage.kind != "evaluate":
        return {}
    results = json.loads(output.read_text()).get("results", {})
    out = {}
    for name, r in results.items():
        for key, label in (("mapE", "E"), ("mapM", "M"), ("mapH", "H"), ("map", ""),
                           ("map100_public", "public"), ("map100_private", "private")):
            if isinstance(r, dict) and isinstance(r.get(key), (int, float)):
                out[f"{name} {label}".strip()] = round(100 * r[key], 2)
    return out


def format_result(result, limit=8):
    """A short text of a result dict for the summary table: 'roxford5k M 61.20  roxford5k H 35.00'."""
    items = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
             if not k.endswith(" E")]
    return "  ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def previous(paths, step):
    """Seconds and result recorded by an earlier run of a skipped stage."""
    done = paths.dir(step.name) / "done.json"
    if done.is_file():
        record = read_json(done)
        step.seconds, step.result = record.get("seconds"), format_result(record.get("result") or {})
