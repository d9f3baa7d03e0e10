"""One method's part of a search space: its dimensions, how a trial samples them and the allocation they
give (the papers' settings written as its parameters: ``priors``). Torch-free."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from allocsearch.allocation.config import ROUTER_SCOPES, AllocationConfig, AllocationError
from allocsearch.allocation.methods import METHOD_NAMES, PRESETS, get_method
from allocsearch.search.space.dims import (Bad, Dim, PerLayer, check_count, check_number, extremes, first, fmt,
                                          is_int, parse_value, to_node)
from allocsearch.allocation.shapes import group_layers

SECTION_KEYS = ("experts", "top_k", "rank", "alpha", "dropout", "targets", "moe_targets", "router_scope", "options",
                "train")
DENSE = ("loracoe",)  # every expert is active: top_k == experts by construction

@dataclass
class MethodSection:
    name: str
    experts: PerLayer | None  # None: plain LoRA / DoRA (one expert)
    top_k: Any  # int or int Dim; None when fixed by the method (dense, peft)
    rank: PerLayer
    alpha: Any
    dropout: Any
    options: dict = field(default_factory=dict)  # option -> value or Dim
    placement_groups: int = 0  # OMoE: placement is one of this many contiguous groups
    fixed: dict = field(default_factory=dict)  # targets, moe_targets
    train: dict = field(default_factory=dict)  # train setting -> value or Dim
    # "linear" | "ffn_block" or a choice Dim of them; None: not set (the allocation's default, linear)
    router_scope: Any = None

    @property
    def prefix(self) -> str:
        return f"{self.name}."

    # ----------------------------------------------------------------------------------- parse
    @classmethod
    def parse(cls, name: str, node, check_train: Callable[[str, dict], None]) -> "MethodSection":
        key = f"methods.{name}"
        if name not in METHOD_NAMES:
            raise Bad(key, f"unknown method {name!r}", f"use one of {', '.join(METHOD_NAMES)}")
        node = {} if node is None else node
        if not isinstance(node, dict):
            raise Bad(key, f"expected a mapping of {', '.join(SECTION_KEYS)}, got {node!r:.40}", "write {rank: 8, ...}")
        for k in node:
            if k not in SECTION_KEYS:
                raise Bad(f"{key}.{k}", "unknown key", f"use {', '.join(SECTION_KEYS)}")
        spec = get_method(name)
        preset = PRESETS[name][1](1) if name in PRESETS else {}
        experts = top_k = None
        if spec.peft:
            for k in ("experts", "top_k", "options", "moe_targets"):
                if k in node and node[k] not in (1, {}, None):
                    raise Bad(f"{key}.{k}", f"{name} is plain {name.upper()} with one expert per layer",
                              f"remove {k} (search experts with mola)")
        else:
            experts = PerLayer.parse(f"{key}.experts", node.get("experts", preset.get("experts", 2)), "experts",
                                     allow_shape=name not in DENSE)
            if name in DENSE:
                if "top_k" in node:
                    raise Bad(f"{key}.top_k", f"{name} averages all its experts (top_k == experts)",
                              "remove top_k and search experts instead")
            else:
                top_k = parse_value(f"{key}.top_k", node.get("top_k", preset.get("top_k", 2)))
                if isinstance(top_k, Dim) and top_k.kind != "int":
                    raise Bad(f"{key}.top_k", "top_k is capped at each trial's experts, which a choice cannot follow",
                              "write {int: [low, high]} or one number")
                check_count(f"{key}.top_k", top_k, what="top_k")
                least = experts.least_max()
                if min(extremes(top_k)) > least:
                    raise Bad(f"{key}.top_k", f"top-k range starts at {min(extremes(top_k))}, above the expert "
                              f"range (as few as {fmt(least)} experts per layer)",
                              f"lower top_k's low to <= {fmt(least)} or raise the experts' low")
        rank = PerLayer.parse(f"{key}.rank", node.get("rank", preset.get("rank", 8)), "rank", allow_shape=False)
        alpha = parse_value(f"{key}.alpha", node.get("alpha", preset.get("alpha", 16.0)))
        check_number(f"{key}.alpha", alpha, 0.0, low_open=True)
        dropout = parse_value(f"{key}.dropout", node.get("dropout", 0.05))
        check_number(f"{key}.dropout", dropout, 0.0, 1.0, high_open=True)
        fixed = {}
        for k in ("targets", "moe_targets"):
            if node.get(k) is not None:
                if not isinstance(node[k], list) or not all(isinstance(t, str) for t in node[k]):
                    raise Bad(f"{key}.{k}", f"{k} must be a list of module names, got {node[k]!r:.40}",
                              "write e.g. [q, v] (it is not a searched dimension)")
                fixed[k] = list(node[k])
        section = cls(name, experts, top_k, rank, alpha, dropout, fixed=fixed,
                      router_scope=_parse_scope(f"{key}.router_scope", spec, node.get("router_scope")))
        section._parse_options(key, spec, node.get("options") or {})
        train = node.get("train") or {}
        if not isinstance(train, dict):
            raise Bad(f"{key}.train", "expected a mapping of train settings", "write {phase_fraction: 0.5}")
        section.train = {k: parse_value(f"{key}.train.{k}", v) for k, v in train.items()}
        check_train(f"{key}.train", section.train)
        section._check_names(key)
        return section

    def _parse_options(self, key: str, spec, options) -> None:
        if not isinstance(options, dict):
            raise Bad(f"{key}.options", "expected a mapping of the method's options", "write {option: value}")
        known = [f.name for f in dataclasses.fields(spec.options_cls)]
        for k, v in options.items():
            where = f"{key}.options.{k}"
            if k not in known:
                raise Bad(where, "unknown option", f"use {', '.join(known) or 'none'}")
            if k == "placement" and isinstance(v, dict) and "groups" in v:
                if set(v) != {"groups"} or not is_int(v["groups"]) or v["groups"] < 1:
                    raise Bad(where, f"placement groups form is {v!r}", "write {groups: G} with G >= 1")
                self.placement_groups = v["groups"]
                continue
            value = parse_value(where, v)
            for x in extremes(value):
                try:
                    spec.make_options({k: x})
                except AllocationError as exc:
                    raise Bad(where, str(exc), f"give {k} only valid values") from None
            self.options[k] = value

    def _check_names(self, key: str) -> None:
        names = list(self.experts.spots(self.prefix)) if self.experts else []
        names += list(self.rank.spots(self.prefix)) + [self.prefix + k for k in ("top_k", "alpha", "dropout")]
        names += [self.prefix + k for k in self.options] + [self.prefix + k for k in self.train]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise Bad(f"{key}.train", f"parameter {dup[0]} is named twice (an option and a train setting)",
                      "rename or drop one of them")
        depth = self.min_depth()
        corner = {n: first(v) for n, v in self.spots().items()}
        for part in (self.experts, self.rank):  # a corner that trains: groups that may be 0 take their most
            if part is not None and part.form == "groups":
                corner.update({n: max(extremes(v)) for n, v in part.spots(self.prefix).items() if first(v) == 0})
        scopes = self.router_scope.values if isinstance(self.router_scope, Dim) else [self.router_scope]
        for scope in scopes:  # every routing scope must build with the fixed targets
            if scope is not None:
                corner[self.prefix + "router_scope"] = scope
            try:
                AllocationConfig.from_dict(self.allocation(corner, depth))
            except AllocationError as exc:
                where = f"{key}.router_scope" if scope == "ffn_block" else key
                raise Bad(where, str(exc), "fix the method's fixed settings") from None

    def to_node(self) -> dict:
        node: dict = {}
        if self.experts is not None:
            node["experts"] = self.experts.to_node()
        if self.top_k is not None:
            node["top_k"] = to_node(self.top_k)
        node.update(rank=self.rank.to_node(), alpha=to_node(self.alpha), dropout=to_node(self.dropout), **self.fixed)
        if self.router_scope is not None:  # absent when not set: older spaces keep their fingerprint
            node["router_scope"] = to_node(self.router_scope)
        options = {k: to_node(v) for k, v in self.options.items()}
        if self.placement_groups:
            options["placement"] = {"groups": self.placement_groups}
        node["options"] = options
        node["train"] = {k: to_node(v) for k, v in self.train.items()}
        return node

    # ----------------------------------------------------------------------------------- dimensions
    def min_depth(self) -> int:
        parts = [self.rank] + ([self.experts] if self.experts else [])
        return max([p.min_depth() for p in parts] + [self.placement_groups, 1])

    def spots(self) -> dict[str, Any]:
        """Parameter name -> fixed value or Dim, in sampling order (experts before top_k)."""
        p = self.prefix
        out = dict(self.experts.spots(p)) if self.experts else {}
        if self.top_k is not None:
            out[p + "top_k"] = self.top_k
        out.update(self.rank.spots(p))
        out.update({p + "alpha": self.alpha, p + "dropout": self.dropout})
        if self.router_scope is not None:
            out[p + "router_scope"] = self.router_scope
        out.update({p + k: v for k, v in self.options.items()})
        if self.placement_groups:
            out[p + "placement"] = Dim("int", (), 0, self.placement_groups - 1, 1)
        out.update({p + k: v for k, v in self.train.items()})
        return out

    def dims(self) -> dict[str, Dim]:
        return {n: v for n, v in self.spots().items() if isinstance(v, Dim)}

    def experts_of(self, params: dict, num_layers: int) -> list[int]:
        return self.experts.layers(params, self.prefix, num_layers) if self.experts else [1] * num_layers

    def trains_nothing(self, params: dict, num_layers: int) -> bool:
        """Whether these values leave every layer frozen (groups that may hold 0 experts or rank 0 all drew 0)."""
        rank = self.rank.layers(params, self.prefix, num_layers)
        return not any(n > 0 and r > 0 for n, r in zip(self.experts_of(params, num_layers), rank))

    def sample(self, trial, num_layers: int) -> dict:
        params: dict = {}
        for name, dim in self.dims().items():
            # top-k is capped at the largest experts of any layer (none when every group drew 0: not run)
            cap = (max(self.experts_of(params, num_layers)) or None) if name == self.prefix + "top_k" else None
            params[name] = dim.suggest(trial, name, high=cap)
        return params

    def count(self, num_layers: int) -> int | None:
        """Distinct parameter dicts of this method (top-k's range depends on the experts)."""
        table = self.experts.max_table(self.prefix, num_layers) if self.experts else [(1, 1)]
        if table is None:
            return None
        total = sum(n * (len(self.top_k.points(high=m)) if isinstance(self.top_k, Dim) else 1) for n, m in table)
        skip = set(self.experts.spots(self.prefix)) if self.experts else set()
        rest = 1  # every dimension but the experts, the ranks and top-k
        for name, dim in self.dims().items():
            if name in skip or name == self.prefix + "top_k":
                continue
            points = dim.points()
            if points is None:
                return None
            total *= len(points)
            if name not in self.rank.spots(self.prefix):
                rest *= len(points)
        # draws that train nothing are not run: not points of the grid
        return total - self._frozen_draws(num_layers) * rest

    def _frozen_draws(self, num_layers: int) -> int:
        """How many (experts, rank, top-k) draws the count above holds that leave every layer frozen (0
        unless a groups form allows 0); top-k counted as above, capped at the draw's largest experts."""
        parts = [p for p in (self.experts, self.rank) if p is not None]
        if not any(p.form == "groups" and 0 in extremes(p.value) for p in parts):
            return 0
        spots = {n: v for p in parts for n, v in p.spots(self.prefix).items()}
        names = [n for n, v in spots.items() if isinstance(v, Dim)]
        values = [spots[n].points() for n in names]
        count = 0
        for combo in itertools.product(*values):
            params = dict(zip(names, combo))
            if self.trains_nothing(params, num_layers):
                top = max(self.experts_of(params, num_layers))
                count += len(self.top_k.points(high=top)) if isinstance(self.top_k, Dim) else 1
        return count

    # ----------------------------------------------------------------------------------- trials
    def allocation(self, params: dict, num_layers: int) -> dict:
        """The complete allocation (per-layer lists) for these parameter values."""
        p = self.prefix
        spots = self.spots()

        def get(name):
            return params[name] if isinstance(spots[name], Dim) else spots[name]

        experts = self.experts_of(params, num_layers)
        if self.experts is None:
            top_k = [1] * num_layers
        elif self.top_k is None:
            top_k = list(experts)
        else:
            top_k = [min(int(get(p + "top_k")), n) for n in experts]
        options = {k: get(p + k) for k in self.options}
        if self.placement_groups:
            options["placement"] = group_layers(num_layers, self.placement_groups, int(get(p + "placement")))
        scope = {"router_scope": get(p + "router_scope")} if self.router_scope is not None else {}
        return {"method": self.name, "num_layers": num_layers, "experts": experts, "top_k": top_k,
                "rank": self.rank.layers(params, p, num_layers), "alpha": float(get(p + "alpha")),
                "dropout": float(get(p + "dropout")), "options": options, **scope, **self.fixed}

    def scopes(self) -> set[str]:
        """The routing scopes this section's trials can have."""
        scope = self.router_scope
        return set(scope.values) if isinstance(scope, Dim) else {scope or "linear"}

    def train_values(self, params: dict) -> dict:
        return {k: params[self.prefix + k] if isinstance(v, Dim) else v for k, v in self.train.items()}

    def describe(self, params: dict) -> str:
        p, spots = self.prefix, self.spots()
        parts = [self.name]
        if self.experts is not None:
            shown = self.experts.describe(params, p)
            parts.append(f"E{shown}" if self.name in DENSE else shown if self.experts.form == "shape"
                         else f"{shown} experts")
        if self.top_k is not None:
            k = params.get(p + "top_k", "?") if isinstance(self.top_k, Dim) else self.top_k
            parts.append(f"top-{k}")
        parts.append("r" + self.rank.describe(params, p))
        shown_spots = set(self.experts.spots(p) if self.experts else {}) | set(self.rank.spots(p)) | {p + "top_k"}
        for name, value in spots.items():
            if name not in shown_spots and isinstance(value, Dim) and name in params:
                parts.append(f"{name[len(p):]} {fmt(params[name])}")
        return " ".join(parts)

    def option_default(self, option: str):
        """The method's own default of an option (what a space without it uses)."""
        fields = {f.name: f.default for f in dataclasses.fields(get_method(self.name).options_cls)}
        return fields.get(option)


def _parse_scope(key: str, spec, node):
    """``router_scope``: one of ROUTER_SCOPES or a choice of them; ffn_block only for methods with a block form."""
    if node is None:
        return None
    value = parse_value(key, node)
    values = value.values if isinstance(value, Dim) and value.kind == "choice" else [value]
    if isinstance(value, Dim) and value.kind != "choice" or any(v not in ROUTER_SCOPES for v in values):
        raise Bad(key, f"router_scope is {node!r:.40}", f"write one of {', '.join(ROUTER_SCOPES)} or "
                  "{choice: [linear, ffn_block]}")
    if "ffn_block" in values and spec.block_layer is None:
        able = ", ".join(m for m in METHOD_NAMES if get_method(m).block_layer)
        raise Bad(key, f"{spec.name} has no FFN-block form (it wraps single Linears)",
                  f"remove router_scope (ffn_block exists for {able})")
    return value
