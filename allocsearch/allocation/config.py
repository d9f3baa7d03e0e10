"""The allocation config: which method, and how many experts, which top-k and which rank every layer gets.

This is the canonical, versioned description of an adapter. Trials are built from it, the search samples
it, and the export file of the best trial is it (plus training settings). Per-layer lists are always
complete (``experts[j]``, ``top_k[j]``, ``rank[j]`` for j = 0..num_layers-1); shapes and presets are only
ways to generate them. It imports no torch, so the controller and the dashboard can read it cheaply.

Fields
    method        a registered method: mola, loracoe, graphlora, omoe (our layers) or lora, dora (peft)
    num_layers    depth of the model the allocation is for (the number of transformer blocks)
    experts       experts per layer (LoRACoE: its composite experts E; LoRA/DoRA: 1)
    top_k         active experts per token per layer (== experts for dense / soft routing)
    rank          LoRA rank per expert per layer
                  A layer with 0 experts or rank 0 holds no adapter: it stays frozen (written 0, 0, 0), so
                  the budget can go to some layers only (AdaLoRA's placement ablation); at least one layer
                  must hold one
    targets       which Linears of each block are adapted, by short name (q,k,v,o,gate,up,down for
                  Llama-style decoders; query,key,value,dense,intermediate,output for BERT) or by a
                  dotted path inside the block (e.g. "mlp.fc1")
    moe_targets   the targets that get experts; the others get one plain LoRA expert of the same rank
                  (MixLoRA: experts on the FFN, LoRA on attention). None: every target gets experts
    router_scope  where a router sits: "linear" (default; every wrapped Linear has its own router and
                  experts) or "ffn_block" (graphlora, mola: ONE router per decoder layer on its gated
                  Llama-style MLP, expert i = down_i(act(gate_i(x)) * up_i(x)) with W + s B_i A_i on each
                  adapted projection; the gate/up/down targets are the block's, every other target gets
                  plain LoRA; the papers' placement for GraphLoRA and MixLoRA). Not for BERT-style encoders
    alpha         LoRA alpha; every expert's scaling is s = alpha / rank[j], applied on the r-sized side
    dropout       LoRA dropout on the expert input
    options       the method's options (see ``allocsearch.allocation.methods``): aux-loss coefficients, GraphLoRA's
                  edge density, OMoE's placement, ...
    preset        the preset it came from, if any (provenance only)
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allocsearch.allocation.methods import METHOD_NAMES, PRESETS, get_method
from allocsearch.errors import AllocationError, AllocsearchError
from allocsearch.allocation.model_info import MODEL_FAMILIES, REGISTRY_CONFIGS, ModelInfoError, model_config

SCHEMA_VERSION = 1

LLAMA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
BERT_TARGETS = ("query", "key", "value", "dense", "intermediate", "output")
KNOWN_TARGETS = LLAMA_TARGETS + BERT_TARGETS
ROUTER_SCOPES = ("linear", "ffn_block")
# targets that name a projection of a gated Llama-style MLP (router_scope ffn_block) -> its short name
FFN_BLOCK_TARGETS = {"gate": "gate", "up": "up", "down": "down",
                     "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
# MODEL_FAMILIES (model_info's): config.model_type -> family whose short target names apply ("llama":
# q/k/v/o_proj + gate/up/down_proj decoders; "bert": BERT-style encoders)
# allocsearch.training.models' registry: (family, transformer blocks) by name, known before anything loads
REGISTRY_MODELS = {name: (MODEL_FAMILIES[c["model_type"]], c["num_hidden_layers"])
                   for name, c in REGISTRY_CONFIGS.items()}


def model_family(model: str) -> str | None:
    """"llama" (gated MLPs: ``router_scope ffn_block`` applies), "bert", or None when unknown, from the
    ``model_type`` of the model's config (``model_info.model_config``: registry name, local folder or cached
    HF id), without loading anything."""
    try:
        return MODEL_FAMILIES.get(model_config(str(model)).get("model_type"))
    except ModelInfoError:
        return None


def ffn_block_misfit(model: str) -> str | None:
    """Why ``router_scope ffn_block`` cannot run on ``model`` (a known family without gated MLPs), or None
    (a Llama-style model, or one whose family only its loading can tell)."""
    family = model_family(model)
    if family is None or family == "llama":
        return None
    return f"ffn_block needs a gated Llama-style MLP but {model} is a {family.upper()}-style encoder"


@dataclass
class AllocationConfig:
    method: str
    num_layers: int
    experts: list[int]
    top_k: list[int]
    rank: list[int]
    targets: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    moe_targets: list[str] | None = None
    router_scope: str = "linear"
    alpha: float = 16.0
    dropout: float = 0.05
    options: Any = None
    preset: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        spec = get_method(self.method)  # raises on an unknown method
        self.experts = _int_list("experts", self.experts)
        self.top_k = _int_list("top_k", self.top_k)
        self.rank = _int_list("rank", self.rank)
        for j, (n, r) in enumerate(zip(self.experts, self.rank)):
            if n == 0 or r == 0:  # a frozen layer, in one form (the lists may still be the wrong length)
                self.experts[j] = self.rank[j] = 0
                if j < len(self.top_k):
                    self.top_k[j] = 0
        self.targets = list(self.targets)
        if self.moe_targets is not None:
            self.moe_targets = list(self.moe_targets)
        if self.options is None or isinstance(self.options, dict):
            self.options = spec.make_options(_typed_options(spec.options_cls, self.options or {}))
        elif not isinstance(self.options, spec.options_cls):
            raise AllocationError(
                f"options for method {self.method!r} must be {spec.options_cls.__name__} or a dict, "
                f"got {type(self.options).__name__}"
            )
        self.validate()
        spec.options_cls.check(self.options, self)

    # ----------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise AllocationError(_version_message(self.schema_version))
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise AllocationError(f"num_layers must be a positive integer, got {self.num_layers!r}")
        for name in ("experts", "top_k", "rank"):
            values = getattr(self, name)
            if len(values) != self.num_layers:
                raise AllocationError(
                    f"{name} has {len(values)} entries but num_layers is {self.num_layers}: "
                    f"give one value per layer"
                )
        for j, (n, k, r) in enumerate(zip(self.experts, self.top_k, self.rank)):
            if n < 0:
                raise AllocationError(f"experts[{j}] = {n}: give 0 (the layer stays frozen) or more")
            if r < 0:
                raise AllocationError(f"rank[{j}] = {r}: give 0 (the layer stays frozen) or more")
            if n == 0:
                continue
            if not 1 <= k <= n:
                raise AllocationError(
                    f"top_k[{j}] = {k} but layer {j} has {n} experts: top_k must be in 1..experts"
                )
        if not self.adapted_layers:
            raise AllocationError("every layer has 0 experts or rank 0, so nothing would train: give at least "
                                  "one layer experts >= 1 and rank >= 1")
        if not self.targets:
            raise AllocationError("targets is empty: name at least one module, e.g. q,v")
        if len(set(self.targets)) != len(self.targets):
            raise AllocationError(f"targets {self.targets} has duplicates")
        for t in self.targets:
            if t not in KNOWN_TARGETS and "." not in t:
                raise AllocationError(
                    f"unknown target {t!r}: use {','.join(LLAMA_TARGETS)} (Llama-style), "
                    f"{','.join(BERT_TARGETS)} (BERT) or a dotted path inside the block such as 'mlp.fc1'"
                )
        if self.moe_targets is not None:
            missing = [t for t in self.moe_targets if t not in self.targets]
            if missing:
                raise AllocationError(f"moe_targets {missing} are not in targets {self.targets}")
        self._validate_router_scope()
        if not self.alpha > 0:
            raise AllocationError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise AllocationError(f"dropout must be in [0, 1), got {self.dropout}")

    def _validate_router_scope(self) -> None:
        if self.router_scope not in ROUTER_SCOPES:
            raise AllocationError(f"router_scope must be one of {', '.join(ROUTER_SCOPES)}, got {self.router_scope!r}")
        if self.router_scope == "linear":
            return
        spec = get_method(self.method)
        if spec.block_layer is None:
            able = [m for m in METHOD_NAMES if get_method(m).block_layer]
            why = "goes through peft, one adapter per Linear" if spec.peft else "wraps single Linears"
            raise AllocationError(f"router_scope ffn_block is for {', '.join(able)}: {self.method} {why}, use "
                                  "router_scope linear")
        ffn = [t for t in self.targets if t in FFN_BLOCK_TARGETS]
        if not ffn:
            raise AllocationError(f"router_scope ffn_block puts the experts on a gated Llama-style MLP but targets "
                                  f"{self.targets} name none of gate, up, down (BERT-style encoders: use "
                                  f"router_scope linear)")
        if len({FFN_BLOCK_TARGETS[t] for t in ffn}) != len(ffn):
            raise AllocationError(f"targets {ffn} name the same MLP projection twice")
        if self.moe_targets is not None and sorted(self.moe_targets) != sorted(ffn):
            raise AllocationError(f"with router_scope ffn_block the experts sit on the FFN block ({', '.join(ffn)}) "
                                  f"and every other target gets plain LoRA: set moe_targets to {ffn} or leave it out")

    # ----------------------------------------------------------------------------------- queries
    def layer(self, j: int) -> dict[str, int]:
        return {"experts": self.experts[j], "top_k": self.top_k[j], "rank": self.rank[j]}

    def adapts(self, j: int) -> bool:
        """Whether layer ``j`` holds an adapter (False: it stays frozen)."""
        return self.experts[j] > 0

    @property
    def adapted_layers(self) -> list[int]:
        return [j for j, n in enumerate(self.experts) if n > 0]

    def is_moe_target(self, target: str) -> bool:
        return self.moe_targets is None or target in self.moe_targets

    @property
    def total_experts(self) -> int:
        return sum(self.experts)

    def replace(self, **changes) -> "AllocationConfig":
        """A validated copy with some fields changed."""
        data = self.to_dict()
        data.update(changes)
        return AllocationConfig.from_dict(data)

    # ----------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["options"] = dataclasses.asdict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AllocationConfig":
        if not isinstance(data, dict):
            raise AllocationError(f"an allocation config must be a mapping, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise AllocationError(_version_message(version))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise AllocationError(f"unknown allocation field(s) {unknown}: known fields are {sorted(names)}")
        missing = [n for n in ("method", "num_layers", "experts", "top_k", "rank") if n not in data]
        if missing:
            raise AllocationError(f"allocation config is missing {missing}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as YAML (or JSON for a .json path) atomically: a crash never leaves half a file."""
        from allocsearch.fileio import write_text_atomic

        return write_text_atomic(path, self.to_json() if Path(path).suffix == ".json" else self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AllocationConfig":
        """Read a YAML or JSON allocation file (``yaml.safe_load`` only)."""
        from allocsearch.fileio import read_yaml

        path = Path(path)
        data = read_yaml(path, "allocation file", AllocationError)
        if isinstance(data, dict) and "allocation" in data and "method" not in data:
            data = data["allocation"]  # a trial or export file that embeds the allocation
        try:
            return cls.from_dict(data)
        except AllocationError as exc:
            raise AllocationError(f"{path}: {exc}") from exc

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def uniform(cls, method: str, num_layers: int, *, experts: int = 1, top_k: int | None = None,
                rank: int = 8, **kwargs) -> "AllocationConfig":
        """The same experts / top-k / rank in every layer (``top_k`` defaults to min(2, experts))."""
        k = min(2, experts) if top_k is None else top_k
        return cls(method=method, num_layers=num_layers, experts=[experts] * num_layers,
                   top_k=[k] * num_layers, rank=[rank] * num_layers, **kwargs)

    @classmethod
    def from_shape(cls, method: str, num_layers: int, shape="inverted_triangle", *,
                   total_experts: int | None = None, top_k: int = 2, rank: int = 8,
                   **kwargs) -> "AllocationConfig":
        """A MoLA shape (see ``allocsearch.allocation.shapes``); top_k is capped at each layer's experts."""
        from allocsearch.allocation.shapes import shape_experts

        experts = shape_experts(shape, num_layers, total_experts)
        return cls(method=method, num_layers=num_layers, experts=experts,
                   top_k=[min(top_k, n) for n in experts], rank=[rank] * num_layers, **kwargs)


def _typed_options(options_cls, values: dict) -> dict:
    """Check each option's type against the method's options class (one line naming the option, the
    expected type and the value); numbers written as strings are read where a float is expected. Unknown
    options pass through: ``make_options`` names them."""
    from allocsearch.allocation.values import typed

    kinds = {f.name: str(f.type) for f in dataclasses.fields(options_cls)}
    return {name: typed(f"options.{name}", kinds[name], value, AllocationError) if name in kinds else value
            for name, value in values.items()}


def _int_list(name: str, values) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise AllocationError(f"{name} must be a list with one integer per layer, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise AllocationError(f"{name} must hold integers, got {v!r}")
        out.append(int(v))
    return out


def _version_message(version) -> str:
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return (f"allocation schema version {version} is newer than this allocsearch understands "
                f"({SCHEMA_VERSION}): upgrade allocsearch")
    return (f"allocation schema version {version!r} is not supported (this allocsearch reads version "
            f"{SCHEMA_VERSION}): re-export it with a matching allocsearch")


def preset(name: str, num_layers: int, **overrides) -> AllocationConfig:
    """A named baseline or paper default as a complete allocation for a model of ``num_layers``."""
    if name not in PRESETS:
        raise AllocsearchError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    fields = PRESETS[name][1](num_layers)
    fields.update(overrides)
    experts, top_k, rank = fields.pop("experts"), fields.pop("top_k"), fields.pop("rank")
    return AllocationConfig.uniform(fields.pop("method"), num_layers, experts=experts, top_k=top_k,
                                    rank=rank, preset=name, **fields)


def resolve_allocation(spec: dict | AllocationConfig, num_layers: int,
                       default_targets: list[str] | None = None) -> AllocationConfig:
    """A complete allocation for a model of ``num_layers`` from a full config, ``{preset: NAME, ...}``,
    ``{method, shape, total_experts, top_k, rank, ...}`` or ``{method, experts: N, top_k: K, rank: R}``."""
    if isinstance(spec, AllocationConfig):
        spec = spec.to_dict()
    d = dict(spec)
    if d.get("num_layers", num_layers) != num_layers:
        raise AllocationError(f"the allocation is for {d['num_layers']} layers but the model has {num_layers}")
    d.pop("num_layers", None)
    if default_targets and "targets" not in d:
        d["targets"] = list(default_targets)
    if isinstance(d.get("experts"), list):
        return AllocationConfig.from_dict({**d, "num_layers": num_layers})
    if "preset" in d and "method" not in d:
        return preset(d.pop("preset"), num_layers, **d)
    if "method" not in d:
        raise AllocationError("the allocation needs a method (or a preset): e.g. {method: mola, experts: 4}")
    if "shape" in d:
        return AllocationConfig.from_shape(d.pop("method"), num_layers, d.pop("shape"), **d)
    experts = d.pop("experts", 1)
    return AllocationConfig.uniform(d.pop("method"), num_layers, experts=experts, **d)


def experts_per_layer(spec: dict | AllocationConfig, num_layers: int) -> list[int] | None:
    """Experts per layer of a trial's allocation (what status and the live view draw); None when it cannot
    be resolved (drawing only: the trial itself reports a bad allocation)."""
    try:
        return resolve_allocation(spec, num_layers).experts
    except (AllocsearchError, TypeError, ValueError, KeyError):
        return None
