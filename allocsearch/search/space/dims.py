"""Building blocks of a search space: one dimension and the per-layer forms of experts and rank.

A dimension is written ``{choice: [a, b]}``, ``{int: [low, high]}`` (``step``, ``log``) or
``{float: [low, high]}`` (``step`` or ``log``); any other value is fixed. Per-layer counts are one value
for every layer, a MoLA shape family (``{shape, per_layer}``), G contiguous groups (``{groups, each}``) or
a fixed total split over G groups (``{groups, total, step}``: every way of writing ``total`` as G multiples
of ``step``, 0 allowed, one categorical dimension such as ``lora.rank_split = "0/8/16"``).
Torch-free; optuna is reached only through the trial object handed in.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from allocsearch.errors import AllocsearchError
from allocsearch.allocation.shapes import SHAPES, group_sizes, shape_experts

DIM_KINDS = ("choice", "int", "float")
_PRIMITIVES = (str, int, float, bool, type(None))


class SpaceError(AllocsearchError, ValueError):
    """A search space that cannot be used; one line naming the file, the key and the fix."""


class Bad(Exception):
    """A problem at a dotted key of the space; the loader turns it into a one-line SpaceError."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem, self.fix = key, problem, fix


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def fmt(v) -> str:
    """Short number form: 0.0012 -> 1.2e-3, 5.0 -> 5, strings as is."""
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            mant, exp = f"{v:.2e}".split("e")
            return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{v:.4g}"
    return str(v)


@dataclass(frozen=True)
class Dim:
    kind: str  # choice | int | float
    values: tuple = ()  # choice
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False

    @classmethod
    def parse(cls, key: str, node: dict) -> "Dim":
        kinds = [k for k in DIM_KINDS if k in node]
        if len(kinds) != 1:
            raise Bad(key, f"a dimension has exactly one of {', '.join(DIM_KINDS)}, got {sorted(node)}",
                      "write {choice: [a, b]}, {int: [low, high]} or {float: [low, high]}")
        kind = kinds[0]
        extra = sorted(set(node) - {kind, "step", "log"} if kind != "choice" else set(node) - {kind})
        if extra:
            raise Bad(key, f"unknown key {extra[0]!r} in a {kind} dimension",
                      "use only step and log" if kind != "choice" else "write {choice: [a, b, ...]}")
        spec = node[kind]
        if kind == "choice":
            if not isinstance(spec, list) or not spec:
                raise Bad(key, "choice is empty or not a list", "list at least one value: {choice: [a, b]}")
            bad = [v for v in spec if not isinstance(v, _PRIMITIVES)]
            if bad:
                raise Bad(key, f"choice value {bad[0]!r} is not a number, string, bool or null",
                          "list plain values only")
            if len({repr(v) for v in spec}) != len(spec):
                raise Bad(key, f"choice {spec} lists a value twice", "list each value once")
            return cls("choice", tuple(spec))
        if not isinstance(spec, list) or len(spec) != 2:
            raise Bad(key, f"{kind} range {spec!r} is empty or not [low, high]", f"write {{{kind}: [low, high]}}")
        low, high = spec
        ok = is_int if kind == "int" else is_number
        if not (ok(low) and ok(high)):
            raise Bad(key, f"{kind} range {spec} holds a non-{'integer' if kind == 'int' else 'number'}",
                      f"write numbers: {{{kind}: [low, high]}}" + (" or use float" if kind == "int" else ""))
        if low > high:
            raise Bad(key, f"range [{fmt(low)}, {fmt(high)}] is inverted", f"write [{fmt(high)}, {fmt(low)}]")
        log, step = node.get("log", False), node.get("step")
        if not isinstance(log, bool):
            raise Bad(key, f"log is {log!r}", "write log: true or leave it out")
        if log and low <= 0:
            raise Bad(key, f"a log range must start above 0, got [{fmt(low)}, {fmt(high)}]", "raise low above 0")
        if step is not None:
            if not ok(step) or step <= 0:
                raise Bad(key, f"step {step!r} is not a positive {kind}", "give a positive step or leave it out")
            if log and (kind == "float" or step != 1):
                raise Bad(key, "step and log cannot be combined", "drop one of them")
            span = (high - low) / step
            if abs(span - round(span)) > 1e-9:
                raise Bad(key, f"high - low = {fmt(high - low)} is not a multiple of step {fmt(step)}",
                          "make high - low a multiple of step")
        if kind == "int":
            step = step or 1
        else:
            low, high = float(low), float(high)
            step = None if step is None else float(step)
        return cls(kind, (), low, high, step, log)

    def to_node(self) -> dict:
        if self.kind == "choice":
            return {"choice": list(self.values)}
        node: dict = {self.kind: [self.low, self.high]}
        if self.step is not None and not (self.kind == "int" and self.step == 1):
            node["step"] = self.step
        if self.log:
            node["log"] = True
        return node

    def points(self, high=None) -> list | None:
        """Every value, or None when continuous; ``high`` caps an int range (top-k)."""
        if self.kind == "choice":
            return list(self.values)
        if self.step is None:
            return None
        top = self.high if high is None else min(self.high, high)
        n = int(math.floor((top - self.low) / self.step + 1e-9)) + 1
        return [self.low + i * self.step if self.kind == "int" else round(self.low + i * self.step, 12)
                for i in range(max(n, 0))]

    def extremes(self) -> list:
        return list(self.values) if self.kind == "choice" else [self.low, self.high]

    def contains(self, v) -> bool:
        if self.kind == "choice":
            return any(type(v) is type(c) and v == c for c in self.values) or (
                is_number(v) and any(is_number(c) and v == c for c in self.values))
        if not is_number(v) or not self.low <= v <= self.high:
            return False
        if self.kind == "int" and not float(v).is_integer():
            return False
        if self.step:
            k = (v - self.low) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def suggest(self, trial, name: str, high=None):
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        if self.kind == "int":
            top = self.high if high is None else min(self.high, high)
            top = self.low + (top - self.low) // self.step * self.step
            return trial.suggest_int(name, self.low, top, step=self.step, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def __str__(self) -> str:
        if self.kind == "choice":
            return "choice [" + ", ".join(fmt(v) for v in self.values) + "]"
        out = f"{self.kind} [{fmt(self.low)}, {fmt(self.high)}]"
        if self.step is not None and not (self.kind == "int" and self.step == 1):
            out += f" step {fmt(self.step)}"
        return out + (" log" if self.log else "")


def parse_value(key: str, node):
    """A dimension when ``node`` is ``{choice|int|float: ...}``, else the fixed value itself."""
    if isinstance(node, dict) and any(k in node for k in DIM_KINDS):
        return Dim.parse(key, node)
    return node


def to_node(value):
    return value.to_node() if isinstance(value, Dim) else value


def extremes(value) -> list:
    return value.extremes() if isinstance(value, Dim) else [value]


def first(value):
    return value.extremes()[0] if isinstance(value, Dim) else value


def check_count(key: str, value, minimum: int = 1, what: str = "") -> None:
    """``value`` (fixed or a dimension) must give whole numbers >= minimum."""
    if isinstance(value, Dim) and value.kind == "float":
        raise Bad(key, f"{what or key} is a whole number, got a float range", "write {int: [low, high]}")
    for v in extremes(value):
        if not is_int(v) and not (isinstance(v, float) and v.is_integer()):
            raise Bad(key, f"{what or key} must be a whole number, got {v!r}", f"give integers >= {minimum}")
        if v < minimum:
            raise Bad(key, f"{what or key} {v} is below {minimum}", f"give values >= {minimum}")


def check_number(key: str, value, low: float, high: float | None = None, low_open=False, high_open=False) -> None:
    for v in extremes(value):
        if not is_number(v):
            raise Bad(key, f"{key.rsplit('.', 1)[-1]} must be a number, got {v!r}", "give a number")
        if v < low or (low_open and v == low) or (high is not None and (v > high or (high_open and v == high))):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            rng = f"{lo}{fmt(low)}, {fmt(high)}{hi}" if high is not None else f"{'>' if low_open else '>='} {fmt(low)}"
            raise Bad(key, f"value {fmt(v)} is outside {rng}", f"keep it in {rng}")


MAX_SPLITS = 10_000  # ways a split form may have (a categorical dimension lists them all)


def splits(total: int, step: int, groups: int) -> list[tuple[int, ...]]:
    """Every way of writing ``total`` as ``groups`` multiples of ``step`` (0 allowed), most in the first
    group first: (total, 0, 0), (total - step, step, 0), ... (stars and bars over total / step units)."""
    units = total // step
    out = []
    for bars in itertools.combinations(range(units + groups - 1), groups - 1):
        edges = (-1, *bars, units + groups - 1)
        out.append(tuple(step * (edges[i + 1] - edges[i] - 1) for i in range(groups)))
    return sorted(out, reverse=True)


def split_text(values) -> str:
    return "/".join(str(int(v)) for v in values)


def parse_split(text) -> list[int]:
    """The per-group counts of a split written ``split_text``'s way ("0/2/4")."""
    return [int(v) for v in str(text).split("/")]


@dataclass(frozen=True)
class PerLayer:
    """Integer counts for every layer: ``uniform`` (value), ``shape`` (shape + per_layer), ``groups`` or
    ``split`` (a fixed total over the groups: ``value`` is the choice of the splits written "a/b/c")."""

    what: str  # experts | rank
    form: str  # uniform | shape | groups | split
    value: Any = None  # uniform: the count; shape: per_layer; groups: each; split: the choice of splits
    shape: Any = None
    groups: int = 0
    total: int = 0  # split: the total and the step it is split in
    step: int = 0

    @classmethod
    def parse(cls, key: str, node, what: str, allow_shape: bool) -> "PerLayer":
        if isinstance(node, dict) and "shape" in node:
            if not allow_shape:
                raise Bad(key, "only experts take a MoLA shape", "give one value or {groups: G, each: ...}")
            extra = sorted(set(node) - {"shape", "per_layer"})
            if extra:
                raise Bad(key, f"unknown key {extra[0]!r} in the shape form", "use shape and per_layer")
            shape = parse_value(f"{key}.shape", node["shape"])
            for s in extremes(shape):
                if s not in SHAPES:
                    raise Bad(f"{key}.shape", f"unknown shape {s!r}", f"use {', '.join(SHAPES)}")
            per_layer = parse_value(f"{key}.per_layer", node.get("per_layer", 5))
            check_number(f"{key}.per_layer", per_layer, 1.0)
            return cls(what, "shape", per_layer, shape)
        if isinstance(node, dict) and "groups" in node and "total" in node:
            return cls._parse_split(key, node, what)
        if isinstance(node, dict) and "groups" in node:
            extra = sorted(set(node) - {"groups", "each"})
            if extra or "each" not in node:
                raise Bad(key, f"the groups form takes groups and each, got {sorted(node)}",
                          "write {groups: 4, each: {int: [1, 8]}}")
            if not is_int(node["groups"]) or node["groups"] < 1:
                raise Bad(f"{key}.groups", f"groups is {node['groups']!r}", "give a whole number >= 1")
            each = parse_value(f"{key}.each", node["each"])
            check_count(f"{key}.each", each, minimum=0, what=what)  # 0: the group's layers stay frozen
            if max(extremes(each)) < 1:
                raise Bad(f"{key}.each", f"every group gets {what} 0, so nothing would train",
                          "allow at least one value >= 1")
            return cls(what, "groups", each, None, node["groups"])
        value = parse_value(key, node)
        check_count(key, value, what=what)
        return cls(what, "uniform", value)

    @classmethod
    def _parse_split(cls, key: str, node: dict, what: str) -> "PerLayer":
        """``{groups: G, total: T, step: S}``: every split of T into G multiples of S (a fixed budget)."""
        extra = sorted(set(node) - {"groups", "total", "step"})
        if extra:
            raise Bad(key, f"unknown key {extra[0]!r} in the split form", "write {groups: 3, total: 24, step: 8}")
        groups, total, step = node["groups"], node["total"], node.get("step", 1)
        for name, v in (("groups", groups), ("total", total), ("step", step)):
            if not is_int(v) or v < 1:
                raise Bad(f"{key}.{name}", f"{name} is {v!r}", "give a whole number >= 1")
        if total % step:
            raise Bad(f"{key}.total", f"total {total} is not a multiple of step {step}",
                      f"give a total of {total - total % step or step} or {total + step - total % step}")
        count = math.comb(total // step + groups - 1, groups - 1)
        if count > MAX_SPLITS:
            raise Bad(key, f"{count:,} ways to split {total} over {groups} groups (at most {MAX_SPLITS:,})",
                      "use a larger step or fewer groups")
        choices = tuple(split_text(v) for v in splits(total, step, groups))
        return cls(what, "split", Dim("choice", choices), None, groups, total, step)

    def split_of(self, params: dict, prefix: str) -> list[int]:
        """The split form's per-group counts under ``params``."""
        return parse_split(params[f"{prefix}{self.what}_split"])

    def to_node(self):
        if self.form == "split":
            return {"groups": self.groups, "total": self.total, "step": self.step}
        if self.form == "shape":
            return {"shape": to_node(self.shape), "per_layer": to_node(self.value)}
        if self.form == "groups":
            return {"groups": self.groups, "each": to_node(self.value)}
        return to_node(self.value)

    def min_depth(self) -> int:
        return max(len(w) for w in SHAPES.values()) if self.form == "shape" else max(self.groups, 1)

    def spots(self, prefix: str) -> dict[str, Any]:
        """Parameter name -> fixed value or dimension, in sampling order."""
        if self.form == "shape":
            return {f"{prefix}shape": self.shape, f"{prefix}per_layer": self.value}
        if self.form == "groups":
            return {f"{prefix}{self.what}_g{g}": self.value for g in range(self.groups)}
        if self.form == "split":
            return {f"{prefix}{self.what}_split": self.value}
        return {f"{prefix}{self.what}": self.value}

    def layers(self, params: dict, prefix: str, num_layers: int) -> list[int]:
        """The count of every layer for these parameter values."""
        def get(name, value):
            return params[name] if isinstance(value, Dim) else value

        if self.form == "shape":
            avg = get(f"{prefix}per_layer", self.value)
            total = max(num_layers, int(math.floor(avg * num_layers + 0.5)))
            return shape_experts(get(f"{prefix}shape", self.shape), num_layers, total)
        if self.form in ("groups", "split"):
            sizes = group_sizes(num_layers, self.groups)
            values = self.split_of(params, prefix) if self.form == "split" else \
                [int(get(f"{prefix}{self.what}_g{g}", self.value)) for g in range(self.groups)]
            return [v for v, n in zip(values, sizes) for _ in range(n)]
        return [int(get(f"{prefix}{self.what}", self.value))] * num_layers

    def least_max(self) -> float:
        """A lower bound of the largest count any layer gets (what top-k's low must not exceed)."""
        if self.form == "split":  # the most even split's largest group
            return self.step * math.ceil(self.total // self.step / self.groups)
        low = min(extremes(self.value))
        if self.form == "groups" and low == 0:  # a trial that trains has a group above 0
            points = self.value.points() if isinstance(self.value, Dim) else None
            low = min(v for v in points if v > 0) if points else 1
        return math.floor(low) if self.form == "shape" else low

    def max_table(self, prefix: str, num_layers: int) -> list[tuple[int, int]] | None:
        """(number of parameter combinations, largest layer count) pairs; None when continuous."""
        if self.form == "split":
            tops = [max(int(v) for v in text.split("/")) for text in self.value.values]
            return [(tops.count(top), top) for top in sorted(set(tops))]
        if self.form == "groups":
            values = self.value.points() if isinstance(self.value, Dim) else [self.value]
            if isinstance(self.value, Dim):
                g = self.groups
                return [(sum(1 for u in values if u <= v) ** g - sum(1 for u in values if u < v) ** g, v)
                        for v in sorted(set(values))]
            return [(1, values[0])]
        if self.form == "shape":
            shapes = self.shape.points() if isinstance(self.shape, Dim) else [self.shape]
            avgs = self.value.points() if isinstance(self.value, Dim) else [self.value]
            if avgs is None:
                return None
            return [(1, max(self.layers({f"{prefix}shape": s, f"{prefix}per_layer": a}, prefix, num_layers)))
                    for s in shapes for a in avgs]
        values = self.value.points() if isinstance(self.value, Dim) else [self.value]
        return [(1, v) for v in values]

    def describe(self, params: dict, prefix: str) -> str:
        def get(name, value):
            return params.get(name, "?") if isinstance(value, Dim) else value

        if self.form == "shape":
            return f"{get(prefix + 'shape', self.shape)} {fmt(get(prefix + 'per_layer', self.value))}/layer"
        if self.form == "groups":
            return "/".join(fmt(get(f"{prefix}{self.what}_g{g}", self.value)) for g in range(self.groups))
        if self.form == "split":
            return str(params.get(f"{prefix}{self.what}_split", "?"))
        return fmt(get(f"{prefix}{self.what}", self.value))


def middle_rate(lr: Dim | None) -> float | None:
    """The learning rate priors run at: the geometric middle of a log range (else the arithmetic one); of a
    list of rates (or a stepped range), the one nearest that middle on a log scale, so a prior never draws
    its rate at random. (Left to the sampler, a paper's allocation ran at the list's worst rate a third of
    the time: measured on benchmarks/sst2-minilm-b, where MoLA at lr 7e-4 scores 0.70-0.77 against 0.81-0.83
    at 1.4e-3.)"""
    if lr is None:
        return None
    points = lr.points()
    if points is None:
        mid = math.sqrt(lr.low * lr.high) if lr.log else (lr.low + lr.high) / 2
        return float(f"{mid:.3g}")
    rates = sorted((v for v in points if is_number(v) and v > 0), key=float)
    if not rates:
        return None
    centre = math.sqrt(float(rates[0]) * float(rates[-1]))
    return min(rates, key=lambda r: (abs(math.log(float(r) / centre)), float(r)))
