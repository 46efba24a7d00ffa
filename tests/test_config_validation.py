"""Config validation at load: every key of the schema refuses wrong values with one error naming it.

The property tests walk the schema itself (types, Literal choices, Annotated ranges), so a key
added later is covered without editing this file.
"""

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insclr.config import Config, ConfigError, config_warnings, load_config
from insclr.constraints import Range

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaves(cls=Config, prefix=""):
    """[(dotted key, annotation)] of every leaf of the schema."""
    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += leaves(hint, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hint))
    return out


KEYS = leaves()


def split(hint):
    """(base type, [constraints]) of an annotation."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *constraints = typing.get_args(hint)
        inner, more = split(base)
        return inner, constraints + more
    return hint, []


def wrong_type(base):
    """Values that are not of type `base` at all."""
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        choices = typing.get_args(base)
        return st.one_of(st.text(max_size=8).filter(lambda t: t not in choices), st.integers(), st.booleans(),
                         st.just({"a": 1}))
    if base is bool:
        return st.one_of(st.integers(), st.text(min_size=1, max_size=5), st.lists(st.booleans(), min_size=1))
    if base is int:
        return st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=6), st.booleans(),
                         st.floats(allow_nan=False).filter(lambda v: v != int(v) if math.isfinite(v) else True),
                         st.lists(st.integers(), min_size=2), st.just({"a": 1}))
    if base is float:
        return st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=6), st.booleans(),
                         st.lists(st.floats(), min_size=2), st.just({"a": 1}), st.just(float("nan")))
    if base is str:
        return st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), min_size=1), st.just({"a": 1}))
    if origin is tuple:
        args = typing.get_args(base)
        bad = st.one_of(st.booleans(), st.just({"a": 1}))
        if not (len(args) == 2 and args[1] is Ellipsis):
            bad = st.one_of(bad, st.lists(st.floats(0.1, 1), min_size=len(args) + 1, max_size=len(args) + 3))
        return bad
    raise AssertionError(f"no strategy for {base}")


def out_of_range(base, constraints):
    """Values of the right type that break a Range constraint (None when there is none)."""
    ranges = [c for c in constraints if isinstance(c, Range)]
    if not ranges or base not in (int, float):
        return None
    r = ranges[0]
    options = []
    if r.lo is not None:
        below = r.lo if r.open_lo else r.lo - (1 if base is int else 1e-3)
        options.append(st.integers(max_value=math.floor(below)) if base is int
                       else st.floats(max_value=below, allow_nan=False, allow_infinity=False))
    if r.hi is not None:
        options.append(st.integers(min_value=math.floor(r.hi) + 1) if base is int
                       else st.floats(min_value=r.hi + 1e-3, allow_nan=False, allow_infinity=False))
    return st.one_of(options)


def _accepts(hint, value):
    from insclr.constraints import check_value

    try:
        check_value(yaml.safe_load(json.dumps(value)), hint, "k", "test")  # as an override reads it
        return True
    except ValueError:
        return False


def invalid_values(hint):
    base, constraints = split(hint)
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # e.g. a number or 'learn'
        arms = typing.get_args(base)
        return st.one_of([invalid_values(a) for a in arms]).filter(
            lambda v: not any(_accepts(a, v) for a in arms))
    strategies = [wrong_type(base)]
    rng = out_of_range(base, constraints)
    if rng is not None:
        strategies.append(rng)
    return st.one_of(strategies)


def override(key, value):
    return f"{key}={json.dumps(value)}"  # JSON is YAML flow syntax: one line, parsed back as YAML


@st.composite
def key_and_invalid_value(draw):
    key, hint = draw(st.sampled_from(KEYS))
    return key, draw(invalid_values(hint))


@SETTINGS
@given(key_and_invalid_value())
def test_every_key_refuses_wrong_values(case):
    key, value = case
    with pytest.raises(ConfigError) as e:
        load_config(None, [override(key, value)])
    assert key in str(e.value)
    assert "\n" not in str(e.value)


ANY_YAML = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=2), max_leaves=5)


@SETTINGS
@given(st.sampled_from([k for k, _ in KEYS]), ANY_YAML)
def test_any_value_is_accepted_or_refused_naming_the_key(key, value):
    try:
        load_config(None, [override(key, value)])
    except ConfigError as e:
        assert "\n" not in str(e)
        assert key in str(e) or key.split(".")[0] in str(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(key_and_invalid_value())
def test_print_config_refuses_with_one_line_and_status_2(capsys, case):
    from insclr.train import main

    key, value = case
    capsys.readouterr()
    assert main(["--print-config", str(CONFIGS / "demo.yaml"), override(key, value)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err


def test_defaults_and_shipped_configs_are_valid():
    load_config()
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_config(path)


def test_choices_match_the_model_tables():
    from insclr.model import ARCHS, HEADS

    hints = dict(KEYS)
    assert set(typing.get_args(hints["model.arch"])) == set(ARCHS)
    assert set(typing.get_args(hints["model.head"])) == set(HEADS)


@pytest.mark.parametrize("overrides, keys", [
    (["memory.version=v2"], ["memory.version", "noaug.enabled"]),
    (["selection.mode=fixed"], ["selection.mode", "noaug.enabled"]),
    (["selection.always_true=5", "data.k=3"], ["selection.always_true", "data.k"]),
    (["memory.negative_thresh=0.8", "memory.positive_thresh=0.7"], ["memory.negative_thresh"]),
    (["train.sync_bn=true", "train.device=cpu"], ["train.sync_bn"]),
])
def test_rules_across_sections_name_their_keys(overrides, keys):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for key in keys:
        assert key in str(e.value)
    assert "command-line override" in str(e.value)


def test_the_issue_examples_are_refused():
    for text in ("train.checkpoint_every=0", "train.steps=-3", "data.k=0", "train.amp=fp8", "memory.version=v3",
                 "model.arch=vgg16", "data.size=-5", "train.milestones=[30,20]", "memory.mode=b+i_tr0_avg0.60_k05",
                 "selection.thresh=1.5", "data.crop_scale=[0.9,0.1]"):
        with pytest.raises(ConfigError, match=text.split("=")[0].replace(".", r"\.")):
            load_config(None, [text])


def test_cuda_without_a_gpu_is_refused_at_load():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="train.device.*no CUDA GPU"):
        load_config(None, ["train.device=cuda"])


def test_batch_must_split_over_the_ranks_torchrun_announces(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="train.batch=64.*split evenly"):
        load_config(None, [])
    monkeypatch.setenv("WORLD_SIZE", "4")
    load_config(None, [])


def test_milestone_beyond_the_steps_is_a_warning_not_an_error(capsys):
    from insclr.train import main

    cfg = load_config(None, ["train.steps=100"])  # a short run of a long recipe, maybe extended later
    assert any("train.milestones" in w for w in config_warnings(cfg))
    assert main(["--print-config", str(CONFIGS / "demo.yaml"), "train.steps=7"]) == 0
    assert "warning: train.milestones=[450], train.steps=7" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the YAML file itself


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 10\n  batch: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not valid YAML: line ") and "column" in message


def test_wrong_type_in_the_file_is_blamed_on_the_file_not_an_override(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": [1, 2], "train": {"steps": "ten"}}))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["data.k=3"])
    assert str(e.value).startswith(f"{path}: 'data' must be a mapping")
    path.write_text(yaml.safe_dump({"train": {"steps": "ten"}}))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.lr=0.1"])
    assert str(e.value).startswith(f"{path}: key 'train.steps'")
    with pytest.raises(ConfigError) as e:  # an override replacing a whole section is blamed on itself
        load_config(path, ["train=5"])
    assert "command-line override 'train=5'" in str(e.value)
