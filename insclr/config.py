"""Typed configuration: YAML files with `base:` inheritance and dotted command-line overrides.

Precedence, lowest first: dataclass defaults < the `base:` chain (outermost base first) <
the file itself < overrides such as `train.steps=100`. Unknown keys and values of the wrong
type are errors that name the key and the file. After loading, each part of the code gets
its own section (`cfg.train`, `cfg.memory`, ...), never the whole tree or a dict.
"""

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from insclr.constraints import (AtLeast, Between, Cosine, Count, NonEmpty, NonNegative, Ordered, Parsed,
                                Positive, PositiveInt, Rule, check_rules, check_value, rule_warnings)


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


# ----------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    shards: Annotated[str, NonEmpty()] = "shards/gldv2"  # training shard folder (python -m insclr.shard)
    pool: str = ""                          # candidate pool (python -m insclr.pool), pool.npz
    size: PositiveInt = 224                 # augmented view: RandomResizedCrop output side
    crop_scale: Annotated[tuple[Positive, Positive], Ordered()] = (0.75, 1.33)  # RandomResizedCrop area range (lo, hi)
    crop_ratio: Annotated[tuple[Positive, Positive], Ordered()] = (0.75, 1.33)  # aspect range, as the original
    k: PositiveInt = 3                      # neighbours per anchor (ALGORITHM §4)
    num_threads: PositiveInt = 2            # DALI CPU threads per rank
    read_threads: PositiveInt = 4           # threads reading JPEG bytes out of the tars
    prefetch: PositiveInt = 2               # batches in flight ahead of the step
    on_bad_sample: Literal["error", "skip"] = "error"  # a damaged image: stop, or replace it (docs/data.md)
    max_bad_samples: Count = 100            # skip: stop once more than this many images were replaced
    decoder: Literal["dali", "pillow"] = "dali"  # pillow: the original's decode + resize, for comparisons (slow)


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet101"
    head: Literal["norm_linear_norm", "linear_norm", "norm", "identity"] = "norm_linear_norm"
    dim: PositiveInt = 2048                 # output dimension of the linear heads
    init: Annotated[str, NonEmpty()] = "imagenet"  # imagenet | random | path of a stage checkpoint
    weights: str = ""                       # torchvision ImageNet weight file ('' = torch hub cache)
    gem_p: Positive | Literal["learn"] = 3.0  # GeM p; learn: a trained parameter initialised at 3


@dataclass
class LossConfig:
    margin: Cosine = 0.4                    # negatives more similar than this contribute
    pos_margin: Annotated[float, Between(0.0, 2.0)] = 0.0
    memory_weight: NonNegative = 1.0


@dataclass
class SelectionConfig:
    mode: Literal["none", "fixed", "dynamic"] = "none"  # ALGORITHM §5
    thresh: Cosine = 0.6
    always_true: Count = 0                  # the first m neighbours are always kept


@dataclass
class NoAugConfig:
    enabled: bool = False                   # the no-augmentation view (impr stage)
    size: PositiveInt = 512
    scales: Annotated[tuple[Positive, ...], NonEmpty()] = (1.0,)
    amp: Literal["auto", "bf16", "fp16", "none"] = "none"  # no-aug forward; none = float32 (the selection cut)


@dataclass
class MemoryConfig:
    version: Literal["none", "v1", "v2"] = "none"  # ALGORITHM §7, §8
    start_step: Count = 0                   # v1: bank update once step > start_step
    get_step: Count = 0                     # v1: memory loss once step > get_step
    get_size: PositiveInt = 100000
    potential_positive: Count = 50          # v1: neighbours excluded from random negatives
    exclude_rows: bool = True               # v1: never draw the step's own images (ours, §7); false: the original's rule
    positive_thresh: Cosine = 0.75          # v2
    negative_thresh: Cosine = 0.5           # v2
    mode: Annotated[str, Parsed("insclr.mining.traversal:parse_mode")] = "b+i_tr4_avg0.60_k05"  # v2 traversal
    use_negative: bool = True               # v2
    init_batch: PositiveInt = 32            # v2: images per batch of the bank initialisation pass
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # bank tables; auto: bfloat16 on a GPU


@dataclass
class TrainConfig:
    out: Annotated[str, NonEmpty()] = "runs/train"  # output folder: checkpoints, metrics, resolved config
    steps: PositiveInt = 60000
    batch: PositiveInt = 64                 # anchors B per step, global over all ranks
    lr: Positive = 1e-4
    milestones: Annotated[tuple[PositiveInt, ...], Ordered(strict=True)] = (40000,)  # within train.steps
    gamma: Positive = 0.1
    weight_decay: NonNegative = 1e-4        # L2 in the param groups (not decoupled)
    no_decay: Literal["bias", "norm_and_bias"] = "bias"  # exempt from decay: names with 'bias' (the original) | all 1-D
    clip_grad: NonNegative = 0.0            # max grad norm, 0 = off
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on CUDA, none on CPU
    compile: bool = False                   # torch.compile the model
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: Count = 0
    threads: Count = 0                      # CPU threads of torch per rank, fixed by the config so that
                                            # OMP_NUM_THREADS/MKL_NUM_THREADS do not change the losses;
                                            # 0 = the machine's cores / ranks on this node (docs/training.md)
    checkpoint_every: PositiveInt = 2000
    resume: Annotated[str, NonEmpty()] = "auto"  # auto | none | path of a checkpoint
    log_every: Count = 10                   # figures read (metrics.jsonl) and, bar off, a line printed every N steps
    max_nonfinite: Count = 10               # consecutive non-finite losses before stopping
    tensorboard: bool = False
    eval_every: Count = 0                   # evaluate at step 0 and every N steps (0 = only at the end; needs eval.data)
    keep_checkpoints: Count = 2             # complete checkpoints kept in OUT/ckpt (older ones deleted; 0 = all)
    freeze_bn: bool = False                 # BatchNorm in eval mode (running stats) for the augmented forward too
    sync_bn: bool = False                   # SyncBatchNorm across ranks (CUDA only)
    progress: bool = True                   # tqdm bar on rank 0


@dataclass
class EvalConfig:
    data: tuple[Literal["roxford5k", "rparis6k", "instre", "gldv2"], ...] = ()  # e.g. (roxford5k, rparis6k)
    shards_root: str = "shards"
    scales: Annotated[tuple[Positive, ...], NonEmpty()] = (1.0, 0.7071067811865476, 0.5)
    show: Count = 0                         # queries drawn in the retrieval picture


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    noaug: NoAugConfig = field(default_factory=NoAugConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- rules across sections


def _cuda_present(cfg):
    if cfg.train.device != "cuda":
        return True
    import torch

    return torch.cuda.is_available()


def _world_divides_batch(cfg):
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)  # set by torchrun: knowable before the launch
    return world < 1 or cfg.train.batch % world == 0


RULES = (
    Rule(("memory.version", "noaug.enabled"), lambda c: c.memory.version != "v2" or c.noaug.enabled,
         "memory bank v2 stores no-aug features: set noaug.enabled=true"),
    Rule(("selection.mode", "noaug.enabled"), lambda c: c.selection.mode == "none" or c.noaug.enabled,
         "in-batch selection compares no-aug features: set noaug.enabled=true (or selection.mode=none)"),
    # Not an error: a run may stop early on purpose and be resumed later with more steps.
    Rule(("train.milestones", "train.steps"), lambda c: all(m <= c.train.steps for m in c.train.milestones),
         "a learning-rate milestone lies beyond the last step, so the learning rate does not decay in "
         "this run", warning=True),
    Rule(("train.eval_every", "eval.data"), lambda c: not c.train.eval_every or bool(c.eval.data),
         "no evaluation set is named, so nothing is evaluated", warning=True),
    Rule(("selection.always_true", "data.k"), lambda c: c.selection.always_true <= c.data.k,
         "cannot always keep more neighbours than data.k gives each anchor"),
    Rule(("memory.negative_thresh", "memory.positive_thresh"),
         lambda c: c.memory.negative_thresh <= c.memory.positive_thresh,
         "the negative threshold must not exceed the positive one"),
    Rule(("train.sync_bn", "train.device"), lambda c: not c.train.sync_bn or c.train.device != "cpu",
         "SyncBatchNorm needs CUDA; on the CPU use train.freeze_bn=true for exact DDP"),
    Rule(("train.device",), _cuda_present, "train.device=cuda, but torch sees no CUDA GPU on this machine"),
    Rule(("train.batch",), _world_divides_batch,
         "the global batch must split evenly over the ranks (WORLD_SIZE from torchrun)"),
)


# ----------------------------------------------------------------------------- loading


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _yaml_problem(error):
    """One line from a YAML error: 'line L, column C: problem' (PyYAML's text spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _merge(into, update):
    """Recursive dict merge; values of `update` win, mappings merge key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _annotate(tree, source):
    """Record, for every key path (sections and leaves), the file that set it last (for error messages)."""
    out = {}
    for key, value in tree.items():
        out[key] = source
        if isinstance(value, dict):
            for sub, src in _annotate(value, source).items():
                out[f"{key}.{sub}"] = src
    return out


def _load_chain(path, seen=()):
    """Merged raw dict of `path` and its `base:` chain, plus where each key came from."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain through {[str(p) for p in seen]}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    merged, sources = {}, {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
        merged, sources = _load_chain(path.parent / base, seen + (path,))
    _merge(merged, data)
    sources.update(_annotate(data, str(path)))
    return merged, sources


def parse_override(text):
    """'train.steps=100' -> (['train', 'steps'], 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {_yaml_problem(e)}") from None
    return key.strip().split("."), parsed


def _build(cls, raw, sources, prefix=""):
    if not isinstance(raw, dict):
        section = prefix.rstrip(".")
        raise ConfigError(f"{sources.get(section, 'config')}: '{section}' must be a mapping of keys, "
                          f"got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = prefix + key
        source = sources.get(full, "config")
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{full}' (known in this section: {sorted(names)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, sources, full + ".")
        else:
            kwargs[key] = check_value(value, hint, full, source, ConfigError)
    return cls(**kwargs)


def _apply_override(raw, sources, text):
    keys, value = parse_override(text)
    node, path = raw, []
    for k in keys[:-1]:
        path.append(k)
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            # the file (not this override) gave a section a value that is not a mapping
            where = ".".join(path)
            raise ConfigError(f"{sources.get(where, 'config')}: '{where}' must be a mapping of keys, "
                              f"got {node!r} (while applying the override {text!r})")
    node[keys[-1]] = value
    full = ".".join(keys)
    for k in [k for k in sources if k == full or k.startswith(full + ".")]:
        del sources[k]  # the override replaced whatever the files set there
    sources.update({full: f"command-line override {text!r}"},
                   **{f"{full}.{k}": f"command-line override {text!r}"
                      for k in (_annotate(value, "") if isinstance(value, dict) else {})})


def config_warnings(cfg, rules=RULES):
    """What in a legal config is probably not what was meant (printed by the training command)."""
    return rule_warnings(cfg, rules)


def load_config(path=None, overrides=(), schema=Config, rules=RULES):
    """Load `path` (may be None: defaults only), apply `overrides`, return a checked `schema` instance.

    Types, fixed choices and ranges are checked key by key (the schema's annotations), then
    `rules` across sections; any violation is a ConfigError naming the key and where it was set.
    """
    raw, sources = _load_chain(path) if path is not None else ({}, {})
    for text in overrides:
        _apply_override(raw, sources, text)
    cfg = _build(schema, raw, sources)
    if schema is Config:
        check_rules(cfg, sources, rules, ConfigError)
    return cfg


def to_dict(cfg):
    """Plain nested dict (tuples become lists) of a config dataclass."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def dump_config(cfg):
    """YAML text of the resolved config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, path):
    """Write the resolved config as YAML next to an output (atomically)."""
    from insclr.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(dump_config(cfg))
