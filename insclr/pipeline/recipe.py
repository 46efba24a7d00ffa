"""Pipeline recipes: YAML files listing stages; loading, validation and stage order.

A recipe:

    name: gldv2                  # optional; default the file name -> runs/<name>/
    stages:
      s0_features: {kind: features, shards: shards/gldv2, model: imagenet, args: {size: 512}}
      s0_pool:     {kind: pool, features: s0_features, args: {k: 500}}
      s1:          {kind: train, config: configs/s1_base.yaml, pool: s0_pool, init: imagenet}
      eval:        {kind: evaluate, model: s1, data: [roxford5k, rparis6k]}

A field that names another stage (`features`, `pool`, `model`, `init`, `after`, and `{dir:NAME}`
inside strings) is an input: that stage runs first and its output is passed on. Errors name the
recipe file and the key.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Per kind: allowed keys (beyond kind/after/nproc), required keys, keys that may name a stage,
# and the stage's main output inside its folder (what a reference to it resolves to).
KINDS = {
    "features": {"keys": {"shards", "model", "args"}, "required": {"shards", "model"},
                 "refs": {"model": ("train", "command")}, "output": "features.npy"},
    "pool": {"keys": {"features", "args"}, "required": {"features"},
             "refs": {"features": ("features", "command")}, "output": "pool.npz"},
    "train": {"keys": {"config", "pool", "init", "shards", "overrides", "max_restarts"},
              "required": {"config", "pool"},
              "refs": {"pool": ("pool", "command"), "init": ("train", "command")}, "output": "model.pt"},
    "evaluate": {"keys": {"model", "data", "args"}, "required": {"model", "data"},
                 "refs": {"model": ("train", "command")}, "output": "eval.json"},
    # A generic stage: runs `argv` as given (a documented feature, used by the tests and for
    # custom steps). `output` names its main output file, `inputs` the stages it reads.
    "command": {"keys": {"argv", "output", "inputs"}, "required": {"argv"}, "refs": {}, "output": None},
}
COMMON_KEYS = {"kind", "after", "nproc"}
TOP_KEYS = {"name", "stages"}
DIR_REF = re.compile(r"\{dir:([A-Za-z0-9_.-]+)\}")
NEW, OLD = ".next", ".previous"  # suffixes of a stage's re-run folder and of the run it replaced


class RecipeError(ValueError):
    """A recipe that cannot be run, with the file and key named."""


@dataclass
class Stage:
    name: str
    kind: str
    spec: dict                        # the stage's keys as written (minus kind/after/nproc)
    inputs: list = field(default_factory=list)   # names of the stages it reads, in first-use order
    nproc: int = None                 # processes for this stage (None: the --nproc value)

    @property
    def output(self):
        return KINDS[self.kind]["output"] if self.kind != "command" else self.spec.get("output")


@dataclass
class Recipe:
    path: Path
    name: str
    stages: dict                      # name -> Stage, in execution order


def _strings(value):
    """Every string inside a nested value (for {dir:NAME} references)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _scalar(value):
    return isinstance(value, (str, int, float, bool)) or value is None


def _strings_list(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_types(path, name, kind, spec):
    where = f"{path}: stages.{name}"
    if "args" in spec and not isinstance(spec["args"], dict):
        raise RecipeError(f"{where}.args must be a mapping of option: value")
    for key, value in (spec.get("args") or {}).items():
        if not (_scalar(value) or (isinstance(value, list) and all(map(_scalar, value)))):
            raise RecipeError(f"{where}.args.{key} must be a value or a list of values, got {value!r}")
    if "overrides" in spec and not (isinstance(spec["overrides"], list)
                                    and all(isinstance(o, str) and "=" in o for o in spec["overrides"])):
        raise RecipeError(f"{where}.overrides must be a list of 'section.key=value' strings")
    if kind == "command" and not (isinstance(spec["argv"], list) and spec["argv"]
                                  and all(isinstance(a, (str, int, float)) for a in spec["argv"])):
        raise RecipeError(f"{where}.argv must be a non-empty list of strings")
    if kind == "evaluate" and not ((isinstance(spec["data"], str) or _strings_list(spec["data"])) and spec["data"]):
        raise RecipeError(f"{where}.data must name the evaluation sets, e.g. [roxford5k, rparis6k]")
    if "inputs" in spec and not _strings_list(spec["inputs"]):
        raise RecipeError(f"{where}.inputs must be a list of stage names")
    restarts = spec.get("max_restarts", 0)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise RecipeError(f"{where}.max_restarts must be an integer >= 0, got {restarts!r}")
    for key in ("shards", "model", "config", "pool", "features", "init", "output"):
        if key in spec and not isinstance(spec[key], str):
            raise RecipeError(f"{where}.{key} must be a string, got {spec[key]!r}")


def _parse_stage(path, name, raw):
    where = f"{path}: stages.{name}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping with a 'kind'")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise RecipeError(f"{where}.kind: {kind!r} is not one of {sorted(KINDS)}")
    rules = KINDS[kind]
    spec = {k: v for k, v in raw.items() if k not in COMMON_KEYS}
    unknown = sorted(set(spec) - rules["keys"])
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown} for kind {kind} "
                          f"(known: {sorted(rules['keys'] | COMMON_KEYS)})")
    missing = sorted(rules["required"] - set(spec))
    if missing:
        raise RecipeError(f"{where}: missing key(s) {missing} for kind {kind}")
    _check_types(path, name, kind, spec)
    nproc = raw.get("nproc")
    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise RecipeError(f"{where}.nproc must be a positive integer, got {nproc!r}")
    return Stage(name, kind, spec, nproc=nproc), raw.get("after", [])


def _resolve_inputs(path, stages, after):
    """Fill Stage.inputs from reference fields, `after` and {dir:NAME}; check names and kinds."""
    for stage in stages.values():
        where = f"{path}: stages.{stage.name}"
        names = []
        for key, kinds in KINDS[stage.kind]["refs"].items():
            value = stage.spec.get(key)
            if value in stages:
                if stages[value].kind not in kinds:
                    raise RecipeError(f"{where}.{key}: stage {value!r} is a {stages[value].kind} stage; "
                                      f"expected one of {list(kinds)}")
                names.append(value)
            elif key in ("features", "pool") and value is not None and not Path(value).suffix:
                raise RecipeError(f"{where}.{key}: {value!r} is neither a stage of this recipe nor a file")
        declared = after[stage.name] if isinstance(after[stage.name], list) else [after[stage.name]]
        if stage.kind == "command":
            declared = declared + list(stage.spec.get("inputs", []))
        extra = [str(d) for d in declared]
        extra += [m for s in _strings(stage.spec) for m in DIR_REF.findall(s)]
        for ref in extra:
            if ref not in stages:
                raise RecipeError(f"{where}: refers to the unknown stage {ref!r} (stages: {list(stages)})")
            names.append(ref)
        if stage.name in names:
            raise RecipeError(f"{where}: a stage cannot take its own output as input")
        stage.inputs = list(dict.fromkeys(names))


def _order(path, stages):
    """Topological order, file order among ready stages; a cycle is an error naming its stages."""
    done, order, pending = set(), [], list(stages)
    while pending:
        ready = [n for n in pending if all(i in done for i in stages[n].inputs)]
        if not ready:
            raise RecipeError(f"{path}: stages form a cycle: {' -> '.join(_cycle(stages, pending))}")
        done.add(ready[0])
        order.append(ready[0])
        pending.remove(ready[0])
    return {n: stages[n] for n in order}


def _cycle(stages, pending):
    """One cycle among `pending` stages, as a list of names that starts and ends on the same stage."""
    node, seen = pending[0], []
    while node not in seen:
        seen.append(node)
        node = next(i for i in stages[node].inputs if i in pending)
    return seen[seen.index(node):] + [node]


def load_recipe(path):
    """Read and validate a recipe file; returns a Recipe with stages in execution order."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: top level must be a mapping with 'stages'")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {unknown} (known: {sorted(TOP_KEYS)})")
    if not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise RecipeError(f"{path}: 'stages' must be a non-empty mapping of stage name -> stage")
    stages, after = {}, {}
    for name, spec in raw["stages"].items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise RecipeError(f"{path}: stage name {name!r} must use only letters, digits, '_', '.', '-'")
        if name.endswith((NEW, OLD)):
            raise RecipeError(f"{path}: stage name {name!r} may not end in {NEW} or {OLD} (the folders "
                              f"of a stage's re-run and of the run it replaced)")
        stages[name], after[name] = _parse_stage(path, name, spec)
    _resolve_inputs(path, stages, after)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise RecipeError(f"{path}: name {name!r} must use only letters, digits, '_', '.', '-'")
    return Recipe(path, name, _order(path, stages))
