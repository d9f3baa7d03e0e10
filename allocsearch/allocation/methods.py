"""The method registry: each method's options (validated, torch-free) and where its layer lives.

Adding a method means: one layer module under ``allocsearch/moe/``, one ``register(...)`` call here with
its options dataclass, one search-space YAML, and its rows in the test matrix. The injector, the CLI and
the tests read this registry; nothing else switches on method names.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from allocsearch.errors import AllocationError

if TYPE_CHECKING:  # pragma: no cover - annotations only (the config imports this registry)
    from allocsearch.allocation.config import AllocationConfig


def _fail(message: str):
    raise AllocationError(message)


# ----------------------------------------------------------------------------------- options
@dataclass
class PeftOptions:
    """LoRA / DoRA through ``peft`` itself: one expert per layer, nothing else to set."""

    def check(self, alloc: "AllocationConfig") -> None:
        if any(n != k or n not in (0, 1) for n, k in zip(alloc.experts, alloc.top_k)):  # 0: a frozen layer
            _fail(f"method {alloc.method!r} is plain {alloc.method.upper()}: experts and top_k must be 1 "
                  f"in every adapted layer (use mola for several experts)")
        if alloc.moe_targets is not None:
            _fail(f"moe_targets has no meaning for {alloc.method!r}: remove it")


@dataclass
class MoLAOptions:
    """MoLA (Gao et al. 2024): per-layer experts, softmax top-k router, optional Switch load balance."""

    load_balance_coef: float = 0.0  # MoLA ships it off; 0.001 is the usual value when on
    # router_scope ffn_block only: recompute each top-k slot's (tokens x d_ff) intermediates (the chosen
    # expert's gate/up, act, product) in backward instead of keeping them: the block form's extra memory
    # over per-Linear routing, at the cost of running that part of the forward twice
    recompute_experts: bool = False

    def __post_init__(self):
        if self.load_balance_coef < 0:
            _fail(f"load_balance_coef must be >= 0, got {self.load_balance_coef}")

    def check(self, alloc: "AllocationConfig") -> None:
        pass


@dataclass
class LoRACoEOptions:
    """LoRACoE (rank-level composition experts). ``experts`` per layer is E; routing is dense over E.

    composition_scale: "rank" multiplies the composition weights by r, so a uniform router reproduces
    the warmed-up LoRA exactly at the switch to joint training and "inference without router" keeps
    the same magnitude; "paper" is the literal eq. (1/E sum_i G_i, weights summing to 1 over r).
    """

    composition_scale: str = "rank"
    router_init_std: float = 0.02

    def __post_init__(self):
        if self.composition_scale not in ("rank", "paper"):
            _fail(f"composition_scale must be 'rank' or 'paper', got {self.composition_scale!r}")
        if self.router_init_std < 0:
            _fail(f"router_init_std must be >= 0, got {self.router_init_std}")

    def check(self, alloc: "AllocationConfig") -> None:
        for j, (n, k) in enumerate(zip(alloc.experts, alloc.top_k)):
            if k != n:
                _fail(f"loracoe averages all its E experts: top_k[{j}] must equal experts[{j}] ({n})")


@dataclass
class GraphLoRAOptions:
    """GraphLoRA (GMoE): graph router + Poisson distinction and Normal load-balance losses."""

    edge_density: float = 0.1  # beta: expert-expert edges / edges of the complete graph (paper best 0.1)
    gcn_hidden: int = 256  # GCN width (paper 256)
    node_dim: int = 64  # node feature size; the token node is act(W_in x) with W_in: node_dim x d_in
    graph_seed: int = 0  # the random expert-expert edges are drawn once from this seed and fixed
    poisson_coef: float = 0.005  # paper
    normal_coef: float = 8.0  # paper
    lambda_init: float = 1.0
    sigma_init: float | None = None  # None: N/2 of each layer's experts (the authors' code)
    # Each GCN layer also gets a root (self) weight, H' = act(Â H W + H W_self) (GraphConv-style): with the
    # plain GCN, experts with the same closed neighbourhood (all of them at beta = 1, both ends of an
    # isolated edge) get identical logits for every token and can never be told apart.
    self_weight: bool = True
    # Recompute the router's (tokens x (N+1) x gcn_hidden) activations in backward instead of keeping
    # them: that tensor is the largest a GraphLoRA layer saves (1600 tokens, 8 experts, width 256:
    # ~15 MB per wrapped Linear), at the cost of running the router forward twice.
    recompute_router: bool = True
    recompute_experts: bool = False  # router_scope ffn_block only: as MoLAOptions.recompute_experts

    def __post_init__(self):
        if not 0.0 < self.edge_density <= 1.0:
            _fail(f"edge_density (beta) must be in (0, 1], got {self.edge_density}")
        if self.gcn_hidden < 1 or self.node_dim < 1:
            _fail("gcn_hidden and node_dim must be >= 1")
        if self.poisson_coef < 0 or self.normal_coef < 0:
            _fail("poisson_coef and normal_coef must be >= 0")
        if self.lambda_init <= 0 or (self.sigma_init is not None and self.sigma_init <= 0):
            _fail("lambda_init and sigma_init must be > 0")

    def check(self, alloc: "AllocationConfig") -> None:
        pass


@dataclass
class OMoEOptions:
    """OMoE: Gram-Schmidt-orthogonal experts in the placed layers, vanilla MoE elsewhere.

    placement: "low" | "middle" | "high" (the paper's levels, layers 1-10 / 11-20 / 21-32 of 32, scaled to
    the depth: ``allocsearch.allocation.shapes.levels``; Tables 4-5), "all", or a list of layer indices.
    orthogonalization: "magnitude" (default) outputs ||e_j|| q_j, so zero-init B leaves the model unchanged
    and step-0 gradients are finite; "unit" is the paper's orthonormal form sum g_j q_j,
    which needs a small non-zero B init (``b_init_std``) and changes the output from the start.
    collinear_tol: an expert whose Gram-Schmidt residual is below this fraction of its own norm (collinear
    with the earlier ones) contributes q_j = 0 (float32 cannot resolve its direction; see moe/omoe.py).
    """

    placement: Any = "low"
    orthogonalization: str = "magnitude"
    eps: float = 1e-6
    b_init_std: float | None = None  # default: 0 for "magnitude", 1e-3 for "unit"
    load_balance_coef: float = 0.0  # pooled per layer as MoLA's; constant 1 (no gradient) with soft routing
    collinear_tol: float = 1e-4

    def __post_init__(self):
        if not 0.0 <= self.collinear_tol < 1.0:
            _fail(f"collinear_tol must be in [0, 1), got {self.collinear_tol}")
        if self.orthogonalization not in ("magnitude", "unit"):
            _fail(f"orthogonalization must be 'magnitude' or 'unit', got {self.orthogonalization!r}")
        if self.b_init_std is None:
            self.b_init_std = 0.0 if self.orthogonalization == "magnitude" else 1e-3
        if self.orthogonalization == "unit" and self.b_init_std <= 0:
            _fail("orthogonalization 'unit' divides by ||B A x||: set b_init_std > 0 (e.g. 1e-3)")
        if self.eps <= 0:
            _fail(f"eps must be > 0, got {self.eps}")
        if isinstance(self.placement, str):
            if self.placement not in ("low", "middle", "high", "all"):
                _fail(f"placement {self.placement!r}: use low, middle, high, all or a list of layer indices")
        elif isinstance(self.placement, (list, tuple)):
            self.placement = [int(p) for p in self.placement]
        else:
            _fail(f"placement must be a name or a list of layer indices, got {self.placement!r}")

    def check(self, alloc: "AllocationConfig") -> None:
        if isinstance(self.placement, list):
            bad = [p for p in self.placement if not 0 <= p < alloc.num_layers]
            if bad:
                _fail(f"OMoE placement names layer(s) {bad} but the model has layers 0..{alloc.num_layers - 1}")

    def layers(self, num_layers: int) -> set[int]:
        """The layer indices that get orthogonal experts."""
        from allocsearch.allocation.shapes import levels

        if self.placement == "all":
            return set(range(num_layers))
        if isinstance(self.placement, str):
            return set(levels(num_layers)[self.placement])
        return set(self.placement)


# ----------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    options_cls: type
    layer: str | None  # "module:Class" of the wrapped-Linear layer; None for peft methods
    peft: bool = False
    phases: tuple[str, ...] = ()  # training phases the trainer steps through (LoRACoE: warmup, joint)
    # "module:Class" of the FFN-block form (one router per decoder layer on a gated MLP, experts = the whole
    # adapted MLP; allocation ``router_scope: ffn_block``); None: the method only wraps single Linears
    block_layer: str | None = None

    def make_options(self, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(self.options_cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            _fail(f"unknown option(s) {unknown} for method {self.name!r}: known options are {sorted(names)}")
        try:
            return self.options_cls(**values)
        except TypeError as exc:
            _fail(f"bad options for method {self.name!r}: {exc}")

    def layer_class(self, router_scope: str = "linear"):
        module, attr = (self.block_layer if router_scope == "ffn_block" else self.layer).split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


register(MethodSpec("lora", "plain LoRA through peft", PeftOptions, None, peft=True))
register(MethodSpec("dora", "DoRA through peft (use_dora=True)", PeftOptions, None, peft=True))
register(MethodSpec("mola", "MoLA: per-layer LoRA experts, top-k softmax router",
                    MoLAOptions, "allocsearch.moe.mola:MoLALinear",
                    block_layer="allocsearch.moe.ffn_block:MoLAFFNBlock"))
register(MethodSpec("loracoe", "LoRACoE: rank-level composition experts", LoRACoEOptions,
                    "allocsearch.moe.loracoe:LoRACoELinear", phases=("warmup", "joint")))
register(MethodSpec("graphlora", "GraphLoRA: GCN graph router over token and expert nodes",
                    GraphLoRAOptions, "allocsearch.moe.graphlora:GraphLoRALinear",
                    block_layer="allocsearch.moe.ffn_block:GraphLoRAFFNBlock"))
register(MethodSpec("omoe", "OMoE: Gram-Schmidt orthogonal experts in placed layers",
                    OMoEOptions, "allocsearch.moe.omoe:OMoELinear"))

METHOD_NAMES = tuple(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        _fail(f"unknown method {name!r}: use one of {', '.join(_REGISTRY)}")


# ----------------------------------------------------------------------------------- presets
FFN_TARGETS = ["gate", "up", "down"]


def _mixlora(num_layers: int, **kw):
    # MixLoRA: top-2 of 8 rank-16 experts on the FFN block (one router per decoder layer, each expert the
    # whole MLP with its own LoRA on gate/up/down), plain LoRA on attention
    return dict(method="mola", experts=8, top_k=2, rank=16, alpha=32.0, moe_targets=FFN_TARGETS,
                router_scope="ffn_block", **kw)


PRESETS: dict[str, tuple[str, Callable[..., dict]]] = {
    "lora": ("LoRA r8 alpha16 on q,k,v,o,gate,up,down (peft)",
             lambda n, **kw: dict(method="lora", experts=1, top_k=1, rank=8, **kw)),
    "dora": ("DoRA r8 alpha16 (peft)", lambda n, **kw: dict(method="dora", experts=1, top_k=1, rank=8, **kw)),
    "mola": ("MoLA paper default: 5 experts per layer, top-2, r8, alpha16",
             lambda n, **kw: dict(method="mola", experts=5, top_k=2, rank=8, **kw)),
    "mixlora": ("MixLoRA: top-2 of 8 r16 experts on the FFN block (one router per layer), LoRA r16 on attention",
                _mixlora),
    "loramoe": ("LoRAMoE: dense router over 4 r8 experts on the FFN projections",
                lambda n, **kw: dict(method="mola", experts=4, top_k=4, rank=8, targets=FFN_TARGETS, **kw)),
    "loracoe": ("LoRACoE paper: r16, alpha32, E=2",
                lambda n, **kw: dict(method="loracoe", experts=2, top_k=2, rank=16, alpha=32.0, **kw)),
    # experts on the FFN projections whatever the scope: router_scope linear (graphlora:linear) changes only
    # where the graph routers sit (one per projection instead of one per block); attention gets plain LoRA
    "graphlora": ("GraphLoRA paper best: one graph router per FFN block, 8 experts, top-2, r2, beta 0.1, LoRA on "
                  "attention", lambda n, **kw: dict(method="graphlora", experts=8, top_k=2, rank=2, alpha=4.0,
                                                     moe_targets=FFN_TARGETS, router_scope="ffn_block", **kw)),
    "omoe": ("OMoE paper: 2 experts, soft routing, r16, alpha32, orthogonal in the low level (layers 1-10 of 32)",
             lambda n, **kw: dict(method="omoe", experts=2, top_k=2, rank=16, alpha=32.0, **kw)),
}
