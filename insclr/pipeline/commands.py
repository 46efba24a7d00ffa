"""Command lines of the stages, and the fingerprint that decides whether a stage is complete.

Each stage becomes `launcher + core`: the launcher is `python` or `python -m torch.distributed.run
--standalone --nproc_per_node G` (torchrun); the core is `-m insclr.<stage CLI> ...`. Only the core
enters the stage's hash, so running again with another --nproc does not redo finished stages.
"""

import argparse
import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

from insclr.pipeline.recipe import DIR_REF, NEW, OLD

TORCHRUN_KINDS = {"train"}           # always through torchrun (its DDP set-up reads torchrun's env)
MULTI_KINDS = {"train", "features"}  # may run on several processes
# torchrun (torch >= 2.5) shares its rendezvous store with the workers and keeps it when it starts
# them again: the restarted ranks read the previous attempt's (dead) addresses from it and cannot
# connect (pytorch/pytorch#135712; still so in torch 2.14). A store per attempt avoids that.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def option_args(args):
    """{'size': 512, 'scales': [1, 0.5], 'amp': False} -> ['--size', '512', '--scales', '1,0.5']."""
    out = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


class StagePaths:
    """Folders of a recipe's stages: runs_root/<recipe>/<stage>/, and beside each while it is run
    again <stage>.next/ (the new run) and after that <stage>.previous/ (the run it replaced)."""

    def __init__(self, recipe, runs_root):
        self.recipe = recipe
        self.root = Path(runs_root) / recipe.name

    def dir(self, name):
        return self.root / name

    def new_dir(self, name):
        return self.root / (name + NEW)

    def old_dir(self, name):
        return self.root / (name + OLD)

    def output(self, name):
        """What a reference to stage `name` resolves to: its main output file (or its folder)."""
        out = self.recipe.stages[name].output
        return self.dir(name) / out if out else self.dir(name)

    def ref(self, value):
        """A field value: the output of the stage it names, else the value itself."""
        return str(self.output(value)) if value in self.recipe.stages else value

    def substitute(self, text, stage, out=None):
        """Replace {out} (`out`, default the stage's folder), {python} and {dir:NAME} inside a string."""
        text = DIR_REF.sub(lambda m: str(self.dir(m.group(1))), str(text))
        return text.replace("{out}", str(out or self.dir(stage.name))).replace("{python}", sys.executable)


def core_argv(stage, paths, out=None):
    """The stage's command without its launcher: ['-m', 'insclr.features', ...] (or a command's argv).

    out: the folder it writes into, by default the stage's own (the one its hash is taken with).
    """
    spec, out = stage.spec, out or paths.dir(stage.name)
    sub = lambda v: paths.substitute(v, stage, out)  # noqa: E731
    args = {k: (sub(v) if isinstance(v, str) else v) for k, v in (spec.get("args") or {}).items()}
    if stage.kind == "features":
        return ["-m", "insclr.features", "--shards", sub(spec["shards"]), "--model", paths.ref(spec["model"]),
                "--out", str(out / "features.npy")] + option_args(args)
    if stage.kind == "pool":
        return ["-m", "insclr.pool", "--features", paths.ref(spec["features"]),
                "--out", str(out / "pool.npz")] + option_args(args)
    if stage.kind == "train":
        argv = ["-m", "insclr.train", spec["config"], f"train.out={out}", f"data.pool={paths.ref(spec['pool'])}"]
        if "init" in spec:
            argv.append(f"model.init={paths.ref(spec['init'])}")
        if "shards" in spec:
            argv.append(f"data.shards={sub(spec['shards'])}")
        # An interrupted stage picks up from its last checkpoint in train.out.
        return argv + ["train.resume=auto"] + [sub(o) for o in spec.get("overrides", [])]
    if stage.kind == "evaluate":
        data = spec["data"] if isinstance(spec["data"], str) else ",".join(spec["data"])
        argv = ["-m", "insclr.evaluate", "--model", paths.ref(spec["model"]), "--data", data,
                "--json", str(out / "eval.json")]
        if "out" not in args:
            argv += ["--out", str(out)]  # retrieval pictures (args show: N) go beside eval.json
        return argv + option_args(args)
    return [sub(a) for a in spec["argv"]]


# The stage CLIs whose argparse parser checks a stage's `args` when the recipe is planned.
CLI_PARSERS = {"features": "insclr.features", "pool": "insclr.pool", "evaluate": "insclr.evaluate.cli"}


def check_args(stage, core):
    """Parse the stage's command with its CLI's own parser, so that a misspelt or ill-typed `args`
    entry fails when the recipe is planned, not after the stages before it have run. Raises ValueError."""
    if stage.kind not in CLI_PARSERS:
        return
    parser = importlib.import_module(CLI_PARSERS[stage.kind])._parser()
    parser.exit_on_error = False
    parser.allow_abbrev = False  # an option is spelt out in full (an ambiguous prefix would exit)
    try:
        _, unknown = parser.parse_known_args(core[2:])
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None
    if unknown:
        raise ValueError(f"{' '.join(unknown)!r} is not an option of python {' '.join(core[:2])}")


def launcher(stage, nproc, max_restarts=0):
    """The interpreter (and torchrun) part of the command line; [] for a `command` stage.

    A training stage is started again by torchrun up to `max_restarts` times (or its own
    `max_restarts:`) after a rank fails; it resumes from its latest checkpoint.
    """
    if stage.kind == "command":
        return []
    nproc = stage.nproc or nproc
    if stage.kind in TORCHRUN_KINDS or (stage.kind in MULTI_KINDS and nproc > 1):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if stage.kind == "train":
            argv.append(f"--max-restarts={stage.spec.get('max_restarts', max_restarts)}")
        return argv
    return [sys.executable]


def launch_env(stage):
    """Environment variables the stage's command needs on top of ours ({} for most)."""
    return dict(RESTART_ENV) if stage.kind == "train" else {}


def display(argv, env=None):
    """The command as a person would type it (torchrun and python for the interpreter)."""
    shown = list(argv)
    if shown[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        shown = ["torchrun"] + shown[3:]
    elif shown[:1] == [sys.executable]:
        shown = ["python"] + shown[1:]
    shown = [f"{k}={v}" for k, v in (env or {}).items()] + shown
    return " ".join(a if a and " " not in a else repr(a) for a in shown)


def _file_fingerprint(path):
    """Content hash of small files (manifests, configs); size and mtime for large ones (checkpoints)."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        path = path / "manifest.json"
        if not path.is_file():
            return None
    st = path.stat()
    if st.st_size <= 16 << 20:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _watched_files(stage, paths, core):
    """Files outside the recipe's stages whose change should rerun the stage."""
    spec, files = stage.spec, []
    if "shards" in spec:
        files.append(paths.substitute(spec["shards"], stage))
    for key in ("model", "init"):
        value = spec.get(key)
        if value and value not in paths.recipe.stages and value not in ("imagenet", "random"):
            files.append(value)
    if stage.kind == "evaluate":
        root = core[core.index("--shards-root") + 1] if "--shards-root" in core else "shards"  # as the CLI gets it
        data = spec["data"] if isinstance(spec["data"], list) else spec["data"].split(",")
        files += [os.path.join(root, d) for d in data]
    return {f: _file_fingerprint(f) for f in files}


def resolved_train_config(core):
    """The resolved config of a train stage (config file + its base chain + our overrides)."""
    from insclr.config import load_config

    return load_config(core[2], core[3:])


def stage_hash(stage, paths, core, input_fingerprints):
    """sha256 over what defines the stage's result: its command, its inputs' completion records,
    the resolved training config, and fingerprints of outside files it reads (shards, models)."""
    identity = {"kind": stage.kind, "argv": core, "inputs": input_fingerprints,
                "files": _watched_files(stage, paths, core)}
    if stage.kind == "train":
        from insclr.config import dump_config

        cfg = resolved_train_config(core)
        identity["config"] = dump_config(cfg)
        identity["files"][cfg.data.shards] = _file_fingerprint(cfg.data.shards)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
