"""Typed configuration: YAML files with `base:` inheritance and dotted command-line overrides.

Precedence, lowest first: dataclass defaults < the `base:` chain (outermost base first) <
the file itself < overrides such as `train.steps=100`. Unknown keys and values of the wrong
type are errors that name the key and the file. After loading, each part of the code gets
its own section (`cfg.train`, `cfg.memory`, ...), never the whole tree or a dict.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


# ----------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    shards: str = "shards/gldv2"            # training shard folder (python -m insclr.shard)
    pool: str = ""                          # candidate pool (python -m insclr.pool), pool.npz
    size: int = 224                         # augmented view: RandomResizedCrop output side
    crop_scale: tuple[float, float] = (0.75, 1.33)  # RandomResizedCrop area range (lo, hi)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    k: int = 3                              # neighbours per anchor (ALGORITHM §4)
    num_threads: int = 2                    # DALI CPU threads per rank
    read_threads: int = 4                   # threads reading JPEG bytes out of the tars
    prefetch: int = 2                       # batches in flight ahead of the step


@dataclass
class ModelConfig:
    arch: str = "resnet101"                 # resnet18 | resnet34 | resnet50 | resnet101
    head: str = "norm_linear_norm"          # norm_linear_norm | linear_norm | norm | identity
    dim: int = 2048                         # output dimension of the linear heads
    init: str = "imagenet"                  # imagenet | random | path of a stage checkpoint
    weights: str = ""                       # torchvision ImageNet weight file ('' = torch hub cache)
    gem_p: float = 3.0


@dataclass
class LossConfig:
    margin: float = 0.4
    pos_margin: float = 0.0
    memory_weight: float = 1.0


@dataclass
class SelectionConfig:
    mode: str = "none"                      # none | fixed | dynamic (ALGORITHM §5)
    thresh: float = 0.6
    always_true: int = 0                    # the first m neighbours are always kept


@dataclass
class NoAugConfig:
    enabled: bool = False                   # the no-augmentation view (impr stage)
    size: int = 512
    scales: tuple[float, ...] = (1.0,)


@dataclass
class MemoryConfig:
    version: str = "none"                   # none | v1 | v2 (ALGORITHM §7, §8)
    start_step: int = 0                     # v1: enqueue once step > start_step
    get_step: int = 0                       # v1: memory loss once step > get_step
    get_size: int = 100000
    potential_positive: int = 50            # v1: neighbours excluded from random negatives
    positive_thresh: float = 0.75           # v2
    negative_thresh: float = 0.5            # v2
    mode: str = "b+i_tr4_avg0.60_k05"       # v2 traversal mode string
    use_negative: bool = True               # v2
    init_batch: int = 32                    # v2: images per batch of the bank initialisation pass


@dataclass
class TrainConfig:
    out: str = "runs/train"                 # output folder: checkpoints, metrics, resolved config
    steps: int = 60000
    batch: int = 64                         # anchors B per step, global over all ranks
    lr: float = 1e-4
    milestones: tuple[int, ...] = (40000,)
    gamma: float = 0.1
    weight_decay: float = 1e-4              # L2 in the param groups (not decoupled); biases 0
    clip_grad: float = 0.0                  # max grad norm, 0 = off
    amp: str = "auto"                       # auto (bf16 on CUDA, none on CPU) | bf16 | fp16 | none
    compile: bool = False                   # torch.compile the model
    channels_last: bool = True
    device: str = "auto"                    # auto | cpu | cuda
    seed: int = 0
    checkpoint_every: int = 2000
    resume: str = "auto"                    # auto | none | path of a checkpoint
    log_every: int = 10                     # with the progress bar off, rank 0 prints a line every N steps (0 = never)
    max_nonfinite: int = 10                 # consecutive non-finite losses before stopping
    tensorboard: bool = False
    eval_every: int = 0                     # 0 = only at the end (if eval.data is set)
    keep_checkpoints: int = 2               # complete checkpoints kept in OUT/ckpt (older ones deleted)
    freeze_bn: bool = False                 # BatchNorm in eval mode (running stats) for the augmented forward too
    sync_bn: bool = False                   # SyncBatchNorm across ranks (CUDA only)
    progress: bool = True                   # tqdm bar on rank 0
    debug_nan_step: int = 0                 # tests only: make the loss NaN at this step (0 = never) ...
    debug_nan_rank: int = -1                # ... on this rank only (-1 = every rank)


@dataclass
class EvalConfig:
    data: tuple[str, ...] = ()              # e.g. (roxford5k, rparis6k)
    shards_root: str = "shards"
    scales: tuple[float, ...] = (1.0, 0.7071067811865476, 0.5)
    show: int = 0                           # queries drawn in the retrieval picture


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


# ----------------------------------------------------------------------------- loading


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(into, update):
    """Recursive dict merge; values of `update` win, mappings merge key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _annotate(tree, source):
    """Record, for every leaf key path, the file that set it last (for error messages)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            for sub, src in _annotate(value, source).items():
                out[f"{key}.{sub}"] = src
        else:
            out[key] = source
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
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key.strip().split("."), parsed


def _check_value(value, hint, key, source):
    """Return `value` converted to type `hint`, or raise naming the key and the file."""
    def fail(expected):
        raise ConfigError(f"{source}: key '{key}' must be {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_value(value, args[0], key, source)
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is expected: one element
        if not isinstance(value, (list, tuple)):
            fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            fail(f"a list of {len(args)} values")
        return tuple(_check_value(v, a, key, source) for v, a in zip(value, args))
    raise ConfigError(f"{source}: key '{key}': unsupported type {hint}")


def _build(cls, raw, sources, prefix=""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{sources.get(prefix.rstrip('.'), 'config')}: '{prefix.rstrip('.')}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = prefix + key
        source = sources.get(full) or next((s for k, s in sources.items() if k.startswith(full + ".")), "config")
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{full}' (known in this section: {sorted(names)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, sources, full + ".")
        else:
            kwargs[key] = _check_value(value, hint, full, source)
    return cls(**kwargs)


def load_config(path=None, overrides=(), schema=Config):
    """Load `path` (may be None: defaults only), apply `overrides`, return a `schema` instance."""
    raw, sources = _load_chain(path) if path is not None else ({}, {})
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
        sources[".".join(keys)] = f"command-line override {text!r}"
    return _build(schema, raw, sources)


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
