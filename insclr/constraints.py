"""Constraints on config values, written next to the fields as `typing.Annotated` metadata.

    steps: Annotated[int, AtLeast(1)] = 60000
    crop_scale: Annotated[tuple[Positive, Positive], Ordered()] = (0.75, 1.33)

Each constraint is a small object whose `problem(value)` returns None when the value is
fine, or what is wrong with it ("must be >= 1"), which the loader turns into an error naming
the key and the file. Fixed choices are `typing.Literal[...]` (checked by the loader itself).
"""

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Optional


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (either bound may be None); `open_lo`: lo < value instead."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    open_lo: bool = False

    def problem(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low_ok = self.lo is None or (value > self.lo if self.open_lo else value >= self.lo)
        if low_ok and (self.hi is None or value <= self.hi):
            return None
        if self.hi is None:
            return f"must be {'>' if self.open_lo else '>='} {self.lo}"
        if self.lo is None:
            return f"must be <= {self.hi}"
        return f"must be in {'(' if self.open_lo else '['}{self.lo}, {self.hi}]"


def AtLeast(lo):  # noqa: N802 (reads like a type in the schema)
    return Range(lo=lo)


def Above(lo):  # noqa: N802
    return Range(lo=lo, open_lo=True)


def Between(lo, hi):  # noqa: N802
    return Range(lo=lo, hi=hi)


@dataclass(frozen=True)
class Ordered:
    """A tuple whose values do not decrease (a (lo, hi) range); `strict`: strictly increasing."""
    strict: bool = False

    def problem(self, value):
        pairs = list(zip(value, value[1:]))
        if any(b < a or (self.strict and b == a) for a, b in pairs):
            return "must be strictly increasing" if self.strict else "must be in increasing order (lo, hi)"
        return None


@dataclass(frozen=True)
class NonEmpty:
    def problem(self, value):
        return "must not be empty" if len(value) == 0 else None


@dataclass(frozen=True)
class Parsed:
    """A string that `parse` (imported lazily, 'module:function') accepts; its ValueError is the problem."""
    parse: str

    def problem(self, value):
        import importlib

        module, name = self.parse.split(":")
        fn: Callable = getattr(importlib.import_module(module), name)
        try:
            fn(value)
        except ValueError as e:
            return f"is not valid ({e})"
        return None


# Shorthands used by the schema.
PositiveInt = Annotated[int, AtLeast(1)]
Count = Annotated[int, AtLeast(0)]
Positive = Annotated[float, Above(0)]
NonNegative = Annotated[float, AtLeast(0)]
Cosine = Annotated[float, Between(-1.0, 1.0)]     # a similarity of L2-normalised features


# ----------------------------------------------------------------------------- checking


def check_value(value, hint, key, source, error=ValueError):
    """Return `value` converted to type `hint` (a schema annotation) and checked against its
    constraints, or raise `error` naming the key and the file (`source`)."""
    def fail(expected):
        raise error(f"{source}: key '{key}' must be {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *constraints = typing.get_args(hint)
        value = check_value(value, base, key, source, error)
        for constraint in constraints:
            problem = constraint.problem(value)
            if problem:
                fail_value = list(value) if isinstance(value, tuple) else value
                raise error(f"{source}: key '{key}' {problem}, got {fail_value!r}")
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) or value not in choices:
            fail("one of " + ", ".join(map(str, choices)))
        return value
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in typing.get_args(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and optional:
            return None
        if len(args) == 1:
            return check_value(value, args[0], key, source, error)
        # several alternatives (e.g. a number or the word 'learn'): the first that accepts it
        problems = []
        for arg in args:
            try:
                return check_value(value, arg, key, source, error)
            except error as e:
                problems.append(str(e).split(f"key '{key}' ", 1)[-1].rsplit(", got ", 1)[0])
        fail(" or ".join(p.removeprefix("must be ") for p in problems))
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("a finite number")
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
            return tuple(check_value(v, args[0], key, source, error) for v in value)
        if len(value) != len(args):
            fail(f"a list of {len(args)} values")
        return tuple(check_value(v, a, key, source, error) for v, a in zip(value, args))
    raise error(f"{source}: key '{key}': unsupported type {hint}")


@dataclass(frozen=True)
class Rule:
    """A constraint between keys of different sections: `holds(cfg)` must be true. A `warning`
    rule only reports (the config is legal, but probably not what was meant)."""
    keys: tuple
    holds: typing.Callable
    message: str
    warning: bool = False

    def describe(self, cfg):
        values = ", ".join(f"{k}={_lookup(cfg, k)!r}" for k in self.keys)
        return f"{values}: {self.message}"


def check_rules(cfg, sources, rules, error=ValueError):
    """Raise `error` for the first of `rules` that `cfg` breaks, naming its keys and where they were set
    (`sources`: key -> file or override)."""
    for rule in rules:
        if not rule.warning and not rule.holds(cfg):
            where = sorted({sources[k] for k in rule.keys if k in sources}) or ["defaults"]
            raise error(f"{'; '.join(where)}: {rule.describe(cfg)}")


def rule_warnings(cfg, rules):
    """Messages of the warning rules that `cfg` breaks."""
    return [rule.describe(cfg) for rule in rules if rule.warning and not rule.holds(cfg)]


def _lookup(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return list(cfg) if isinstance(cfg, tuple) else cfg
