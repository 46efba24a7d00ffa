"""Deciding which stages run, running them as subprocesses, and the completion records.

Per stage folder runs/<recipe>/<stage>/:
- `started.json` {hash, argv}: written before the stage's command starts. If the run is cut
  short, the next run with the same hash resumes in the same folder (training: from its
  checkpoint, train.resume=auto); a different hash clears the folder first.
- `done.json` {hash, argv, inputs, seconds, finished, result}: written LAST, after the command
  succeeded and its output exists. A stage is complete when its done.json holds the hash that
  the stage has now. The hash covers the stage's inputs' done.json files, so a stage that
  runs again makes every stage that reads it run again.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from insclr.config import ConfigError
from insclr.io import read_json, write_json
from insclr.pipeline.commands import check_args, core_argv, display, launcher, stage_hash
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


def _status(stage, paths, current):
    """(action, reason) from the records on disk, assuming the inputs stay as they are."""
    folder = paths.dir(stage.name)
    done = read_json(folder / "done.json") if (folder / "done.json").is_file() else None
    if done and done.get("hash") == current:
        return "skip", "complete"
    if done:
        return "run", "config or inputs changed"
    started = read_json(folder / "started.json") if (folder / "started.json").is_file() else None
    if started and started.get("hash") == current:
        return "resume", "interrupted run"
    return "run", "not run yet" if not started else "config or inputs changed"


def plan(recipe, paths, nproc, from_stage=None, only=None, until=None):
    """One Step per stage, in order: what a run would do and why."""
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
        step = Step(name, stage.kind, "", "", launcher(stage, nproc) + core)
        if only is not None and name != only:
            step.action, step.reason = "not selected", "--only"
        elif i > stop:
            step.action, step.reason = "not selected", "after --until"
        elif only == name or (from_stage and i >= start):
            step.action, step.reason = "forced", "--only" if only else "--from"
        elif from_stage and i < start:
            step.action, step.reason = "skip", "before --from"
        else:
            changed = [n for n in stage.inputs if n in rerunning]
            if changed:
                step.action, step.reason = "run", f"input {changed[0]} runs before it"
            else:
                step.action, step.reason = _status(stage, paths, current)
        if step.action in ("run", "forced", "resume"):
            rerunning.add(name)
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


def _prepare(folder, current, step):
    """Clear the stage folder unless it holds an interrupted run of the same stage."""
    started = folder / "started.json"
    same = started.is_file() and read_json(started).get("hash") == current
    if folder.exists() and (step.action == "forced" or not same or (folder / "done.json").exists()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(started, {"hash": current, "argv": step.argv, "started": time.time()})


def run_stage(recipe, paths, step, log=print):
    """Run one stage's command and write its done.json; returns seconds spent."""
    stage = recipe.stages[step.name]
    folder = paths.dir(step.name)
    core = core_argv(stage, paths)
    current = _hash(stage, paths, core)
    _prepare(folder, current, step)
    log(f"== {step.name} ({step.kind}, {step.reason}): {display(step.argv)}")
    sys.stdout.flush()  # our line before the child's output
    start = time.time()
    code = subprocess.call(step.argv)
    seconds = time.time() - start
    if code != 0:
        raise StageFailed(f"stage {step.name} failed with exit code {code} after {seconds:.0f} s: "
                          f"{display(step.argv)} (rerun the pipeline to resume it)")
    output = paths.output(step.name)
    if stage.output and not output.exists():
        raise StageFailed(f"stage {step.name} finished but did not write {output}")
    result = read_result(stage, output)
    write_json(folder / "done.json", {"hash": current, "argv": step.argv, "seconds": round(seconds, 3),
                                      "inputs": {i: fingerprint(paths, i) for i in stage.inputs},
                                      "finished": time.time(), "result": result})
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
