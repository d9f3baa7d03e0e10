"""The FFN-block form (allocation ``router_scope: ffn_block``): ONE router per decoder layer on its MLP.

Where GraphLoRA (seeds/graphlora.txt §3) and MixLoRA put the mixture: the router reads the FFN's input
``x`` (the token after attention + norm), and expert i is the whole gated MLP with its own LoRA on each
adapted projection (METHODS.md, GraphLoRA "Where")::

    E_i(x) = down_i(act(gate_i(x)) * up_i(x)),   proj_i(v) = W_proj v + s B^proj_i A^proj_i dropout(v)
    y      = sum_{i in topK} R_i E_i(x)          (R renormalised over the top K, summing to 1)

Attention (every target that is not gate/up/down) gets plain LoRA of the same rank (``LoRALinear``).
Computed as MoE-PEFT does, without running the frozen MLP once per expert:
  * ``W_gate x`` and ``W_up x`` once, shared by all experts; each chosen expert adds its delta;
  * ``W_down`` is linear, so ``sum_i R_i W_down h_i = W_down (sum_i R_i h_i)``: one frozen down matmul;
  * per top-K slot, the chosen expert's delta as "a wide LoRA with a sparse middle" (all experts' A in one
    matmul, the unchosen experts' r-slices zeroed, all B in one matmul; see ``experts.py``).
The only per-slot tensors are the (tokens, K, d_ff) intermediates ``h_i = act(gate_i x) * up_i x``.

Two routers: ``MoLAFFNBlock`` (softmax top-k, MixLoRA; Switch load balance per block router) and
``GraphLoRAFFNBlock`` (the graph router of ``graphlora.py`` with its Poisson / Normal losses, once per
block). Both keep the wrapped-Linear layers' interface (aux loss, expert load, adapter parameters and
state found by visiting the layer objects), so the Adapter, the trainer and the analysis need no changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from allocsearch.allocation.config import FFN_BLOCK_TARGETS, AllocationConfig, AllocationError
from allocsearch.allocation.methods import get_method
from allocsearch.moe.adapter import adapter_of, find_blocks, replace_module, resolve_targets
from allocsearch.moe.base import MoELoRALayer
from allocsearch.moe.experts import LoRAExperts
from allocsearch.moe.graphlora import GraphRouter
from allocsearch.moe.mola import make_router
from allocsearch.moe.routers import Route, topk_route

PROJECTIONS = ("gate", "up", "down")


class LoRALinear(MoELoRALayer):
    """Plain LoRA, ``h = W0 x + s B A dropout(x)`` (one expert, no router): attention in the block form."""

    def __init__(self, base: nn.Linear, **kwargs):
        super().__init__(base, **kwargs)
        self.experts = LoRAExperts(1, self.rank, self.in_features, self.out_features, **self._factory)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.experts.project(x, self.lora_dropout)
        return self.experts.combine(z, self.scaling)


def gated_mlp(block: nn.Module) -> nn.Module | None:
    """The block's Llama-style MLP (``gate_proj``, ``up_proj``, ``down_proj`` Linears and ``act_fn``), or None."""
    mlp = getattr(block, "mlp", None)
    if mlp is None or not callable(getattr(mlp, "act_fn", None)):
        return None
    if not all(isinstance(getattr(mlp, f"{p}_proj", None), nn.Linear) for p in PROJECTIONS):
        return None
    return mlp


class FFNBlockMoE(nn.Module):
    """Base of the block form: experts on ``projections`` of a frozen gated MLP; subclasses route."""

    target = "ffn"

    def __init__(self, mlp: nn.Module, *, experts: int, top_k: int, rank: int, alpha: float, dropout: float,
                 options, layer_index: int, num_layers: int, projections: tuple[str, ...]):
        super().__init__()
        self.base = mlp  # the original MLP: frozen, excluded from the adapter's parameters and state
        for p in mlp.parameters():
            p.requires_grad_(False)
        self.in_features = self.out_features = mlp.gate_proj.in_features
        self.intermediate = mlp.gate_proj.out_features
        self.num_experts, self.top_k, self.rank = experts, top_k, rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.options, self.layer_index, self.num_layers = options, layer_index, num_layers
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self.aux_loss: torch.Tensor | None = None
        self.balance = None  # Switch statistics for the per-layer pooling (MoLA); see MoELoRALayer
        self.track_load = False
        self.token_mask: torch.Tensor | None = None  # real (non-padding) positions; see MoELoRALayer
        w = mlp.gate_proj.weight
        fac = {"device": w.device, "dtype": w.dtype}
        self._register_load_counts(experts, w.device)
        sizes = {"gate": (self.in_features, self.intermediate), "up": (self.in_features, self.intermediate),
                 "down": (self.intermediate, self.out_features)}
        self.lora = nn.ModuleDict({p: LoRAExperts(experts, rank, *sizes[p], **fac) for p in self.projections})

    def _factory(self) -> dict:
        w = self.base.gate_proj.weight
        return {"device": w.device, "dtype": w.dtype}

    # the wrapped-Linear interface, shared with MoELoRALayer (it reads only attributes set above)
    _register_load_counts = MoELoRALayer._register_load_counts
    _real = MoELoRALayer._real
    _after_routing = MoELoRALayer._after_routing
    expert_load = MoELoRALayer.expert_load
    reset_load = MoELoRALayer.reset_load
    set_phase = MoELoRALayer.set_phase
    adapter_parameters = MoELoRALayer.adapter_parameters
    adapter_state_dict = MoELoRALayer.adapter_state_dict
    extra_repr = MoELoRALayer.extra_repr

    def redundancy(self) -> float:
        """MoLA §5.1 redundancy, averaged over the adapted projections."""
        return sum(e.redundancy() for e in self.lora.values()) / len(self.lora)

    # ------------------------------------------------------------------ routing (subclasses)
    def router_weight(self) -> torch.Tensor | None:
        """The matrix applied to x for the router's input (fused with the experts' A); None: no router."""
        return None

    def route(self, r: torch.Tensor | None, t: int, device) -> Route:
        """The route of ``t`` tokens from ``router_weight() @ x``; records aux loss and expert load."""
        ones = torch.ones(t, 1, device=device)
        return Route(ones, ones, torch.zeros(t, 1, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.mix(x.reshape(-1, shape[-1])).view(*shape[:-1], self.out_features)

    def _project(self, x: torch.Tensor):
        """``{proj: A_proj dropout(x)}`` for gate/up and the router's input, in one matmul when possible."""
        names = [p for p in ("gate", "up") if p in self.lora]
        mats = [self.lora[p].lora_A for p in names]
        rw = self.router_weight()
        no_dropout = isinstance(self.lora_dropout, nn.Identity) or not self.training
        if no_dropout:
            mats = mats + ([rw.to(x.dtype)] if rw is not None else [])
            if not mats:
                return {}, None
            parts = F.linear(x, torch.cat(mats)).split([m.shape[0] for m in mats], dim=-1)
            return dict(zip(names, parts)), (parts[-1] if rw is not None else None)
        xd = self.lora_dropout(x)
        z = {p: F.linear(xd, self.lora[p].lora_A) for p in names}
        return z, (F.linear(x, rw.to(x.dtype)) if rw is not None else None)

    def _slot_delta(self, proj: str, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """``s B_e A_e x`` of each slot's chosen expert e, shape (T, K, d_out): the slot's expert keeps its
        r-slice of ``z`` (T, N r), the others are zeroed, then all B in one matmul."""
        t, (n, r) = z.shape[0], (self.num_experts, self.rank)
        zs = z.view(t, 1, n, r) * (onehot * self.scaling).unsqueeze(-1)  # (T, K, N, r)
        return F.linear(zs.reshape(t, onehot.shape[1], n * r), self.lora[proj].lora_B)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        z, r = self._project(x)
        route = self.route(r, x.shape[0], x.device)
        w = route.gates.gather(1, route.index).to(x.dtype)  # (T, K): the chosen experts' weights, sum 1
        onehot = F.one_hot(route.index, self.num_experts).to(x.dtype)  # (T, K, N)
        slots = (x, z.get("gate"), z.get("up"), onehot, w)
        if getattr(self.options, "recompute_experts", False) and self.training and torch.is_grad_enabled():
            h_mix, zd = checkpoint(self._slots, *slots, use_reentrant=False)  # dropout masks replayed
        else:
            h_mix, zd = self._slots(*slots)
        y = self.base.down_proj(h_mix)  # sum_i R_i W_down h_i = W_down sum_i R_i h_i
        return y if zd is None else y + F.linear(zd, self.lora["down"].lora_B)

    def _slots(self, x, z_gate, z_up, onehot, w):
        """Per top-K slot, the chosen expert's ``h_i = act(gate_i x) * up_i x`` (T, K, d_ff), mixed:
        ``sum_i R_i h_i`` for the frozen down projection and the down experts' gated r-slices ``zd``."""
        t, mlp = x.shape[0], self.base
        gate = mlp.gate_proj(x).unsqueeze(1)  # frozen W_gate x, once for all experts
        up = mlp.up_proj(x).unsqueeze(1)
        if z_gate is not None:
            gate = gate + self._slot_delta("gate", z_gate, onehot)
        if z_up is not None:
            up = up + self._slot_delta("up", z_up, onehot)
        h = mlp.act_fn(gate) * up  # (T, K, d_ff), or (T, 1, d_ff) when no expert touches gate/up
        h_mix = (w.unsqueeze(-1) * h).sum(1) if h.shape[1] > 1 else h[:, 0] * w.sum(1, keepdim=True)
        if "down" not in self.lora:
            return h_mix, None
        n, rank = self.num_experts, self.rank
        zd = F.linear(self.lora_dropout(h), self.lora["down"].lora_A).view(t, h.shape[1], n, rank)
        mask = (onehot * w.unsqueeze(-1) * self.scaling).unsqueeze(-1)  # (T, K, N, 1)
        if h.shape[1] == 1:  # one h for every slot: weight each expert's slice by its gate
            mask = mask.sum(1, keepdim=True)
        return h_mix, (zd * mask).sum(1).reshape(t, n * rank)


class MoLAFFNBlock(FFNBlockMoE):
    """MixLoRA's form: softmax top-k router ``W_r: N x d`` on the FFN input; Switch balance per block."""

    def __init__(self, mlp: nn.Module, **kwargs):
        super().__init__(mlp, **kwargs)
        self.router = make_router(self.num_experts, self.in_features, self._factory())

    def router_weight(self):
        return self.router

    def route(self, r, t, device):
        if self.router is None:
            return super().route(r, t, device)
        route = topk_route(r, self.top_k)
        self._after_routing(route, self.options.load_balance_coef)
        return route


class GraphLoRAFFNBlock(GraphRouter, FFNBlockMoE):
    """GraphLoRA as in the paper: one graph router per decoder layer; Poisson + Normal losses per block."""

    def __init__(self, mlp: nn.Module, **kwargs):
        super().__init__(mlp, **kwargs)
        self._build_graph_router(self.num_experts, self.in_features, self._factory())

    def router_weight(self):
        return self.token_in  # W_in: the token node's features act(W_in x)

    def route(self, r, t, device):
        route = topk_route(self.graph_logits(r), self.top_k)
        real = self._after_routing(route)  # the non-padding tokens' routing, for the losses
        if self.training:
            self.aux_loss = self.graph_aux_loss(real)
        return route


def inject_ffn_blocks(model: nn.Module, allocation: AllocationConfig, *, train_modules: tuple[str, ...] = ()):
    """``inject`` for ``router_scope: ffn_block``: each decoder layer's MLP becomes the method's block
    layer; every other target gets plain LoRA (``LoRALinear``). Returns the Adapter."""

    prefix, blocks = find_blocks(model)
    if any(gated_mlp(b) is None for b in blocks):
        raise AllocationError(f"router_scope ffn_block needs a gated Llama-style MLP (mlp.gate_proj, up_proj, "
                              f"down_proj, act_fn) in every block; {type(model).__name__} has none: use "
                              f"router_scope linear (BERT-style encoders stay per-Linear)")
    targets = resolve_targets(model, allocation)
    for p in model.parameters():
        p.requires_grad_(False)
    block_cls = get_method(allocation.method).layer_class("ffn_block")
    projections = tuple(FFN_BLOCK_TARGETS[t] for t in allocation.targets if t in FFN_BLOCK_TARGETS)
    common = dict(alpha=allocation.alpha, dropout=allocation.dropout, options=allocation.options,
                  num_layers=allocation.num_layers)
    layers: dict[str, nn.Module] = {}
    for j, target, path in targets:  # attention (every target outside the MLP): plain LoRA
        if target not in FFN_BLOCK_TARGETS:
            layers[path] = replace_module(model, path, lambda base: LoRALinear(
                base, experts=1, top_k=1, rank=allocation.rank[j], layer_index=j, target=target, **common))
    for j in allocation.adapted_layers:  # a frozen layer keeps its MLP
        path = f"{prefix}.{j}.mlp"
        layers[path] = replace_module(model, path, lambda mlp: block_cls(
            mlp, experts=allocation.experts[j], top_k=allocation.top_k[j], rank=allocation.rank[j],
            layer_index=j, projections=projections, **common))
    layers = dict(sorted(layers.items(), key=lambda item: item[1].layer_index))  # decoder layer order
    return adapter_of(model, allocation, layers, train_modules)


__all__ = ["FFNBlockMoE", "GraphLoRAFFNBlock", "LoRALinear", "MoLAFFNBlock", "gated_mlp", "inject_ffn_blocks"]
