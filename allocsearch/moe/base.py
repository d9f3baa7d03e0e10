"""The wrapped-Linear base every MoE-LoRA method shares.

``h = W0 x + delta(x)``: ``W0`` (the original ``nn.Linear``) stays frozen; a method implements ``delta``.
The base also keeps what the trainer and the analysis read after a forward: the layer's weighted
auxiliary loss (training only) and, when tracking is on, how many tokens each expert received.
"""
from __future__ import annotations

import torch
from torch import nn

from allocsearch.moe.losses import SwitchStats, pooled_switch_load_balance, switch_stats
from allocsearch.moe.routers import Route, expert_counts


def load_count_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the expert-load counters: float64 (exact token counts far past float32's 2^24), except on
    Apple MPS, which has no float64 (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class MoELoRALayer(nn.Module):
    """Base class; subclasses build their parameters in ``__init__`` and implement ``delta``."""

    def __init__(self, base: nn.Linear, *, experts: int, top_k: int, rank: int, alpha: float,
                 dropout: float, options, layer_index: int, num_layers: int, target: str):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.top_k, self.rank = experts, top_k, rank
        self.scaling = alpha / rank  # s = alpha / r, applied on the r-sized side
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.options = options
        self.layer_index, self.num_layers, self.target = layer_index, num_layers, target
        self.aux_loss: torch.Tensor | None = None  # weighted auxiliary loss of the last training forward
        # (coef, this module's Switch statistics) of the last training forward: pooled per decoder layer by
        # pooled_load_balance, as MoLA does, rather than one loss per module
        self.balance: tuple[float, SwitchStats] | None = None
        self.track_load = False
        self._register_load_counts(experts, base.weight.device)
        # (tokens,) bool of the batch being run: its real, non-padding positions (the Adapter sets it from the
        # model's attention_mask). Expert load and the routing losses count only these, as the Switch loss
        # with an attention mask does (transformers' load_balancing_loss_func); None: every position counts
        self.token_mask: torch.Tensor | None = None

    # factory kwargs for new parameters: same device and dtype as W0
    @property
    def _factory(self) -> dict:
        w = self.base.weight
        return {"device": w.device, "dtype": w.dtype}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        return self.base(x) + self.delta(flat).view(*shape[:-1], self.out_features).to(x.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # (T, d_in) -> (T, d_out)
        raise NotImplementedError

    # ------------------------------------------------------------------ routing bookkeeping
    def _register_load_counts(self, slots: int, device: torch.device) -> None:
        """The ``load_counts`` buffer: one counter per expert (LoRACoE: per rank) on the weights' device."""
        self.register_buffer("load_counts", torch.zeros(slots, dtype=load_count_dtype(device), device=device),
                             persistent=False)

    def _real(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (one per position of the batch) without the padding positions, when the mask fits."""
        mask = self.token_mask
        return rows[mask] if mask is not None and mask.shape[0] == rows.shape[0] else rows

    def _after_routing(self, route: Route, coef: float = 0.0) -> Route:
        """Record expert load and, while training, this module's Switch load-balance statistics (weighted by
        ``coef``; :func:`pooled_load_balance` turns a layer's modules into one loss), over the real tokens
        only; returns the route of those tokens (for the method's own routing losses)."""
        route = Route(self._real(route.gates), self._real(route.probs), self._real(route.index))
        if self.track_load:
            with torch.no_grad():
                self.load_counts += expert_counts(route.index, self.num_experts, self.load_counts.dtype)
        if self.training and coef > 0:
            self.balance = (coef, switch_stats(route.probs, route.index))
        return route

    def expert_load(self) -> list[float]:
        """Fraction of routed token slots each expert received since the last reset."""
        total = float(self.load_counts.sum())
        return [float(c) / total if total else 0.0 for c in self.load_counts]

    def reset_load(self) -> None:
        self.load_counts.zero_()

    def redundancy(self) -> float:
        """MoLA §5.1 redundancy of this layer's experts (see ``LoRAExperts.redundancy``)."""
        experts = getattr(self, "experts", None)
        return experts.redundancy() if experts is not None else 0.0

    def set_phase(self, phase: str) -> None:
        """Training phase hook (LoRACoE's warm-up / joint); other methods ignore it."""

    # ------------------------------------------------------------------ adapter parameters
    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every parameter of this layer except the frozen base Linear's (found by identity)."""
        base_ids = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base_ids]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter parameters and persistent buffers (e.g. GraphLoRA's fixed graph), base excluded."""
        base_ids = {id(t) for t in list(self.base.parameters()) + list(self.base.buffers())}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) not in base_ids}

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, target={self.target}, experts={self.num_experts}, "
                f"top_k={self.top_k}, rank={self.rank}, scaling={self.scaling:g}")


def pooled_load_balance(layers) -> torch.Tensor | float:
    """MoLA's load balance: ``sum_l coef * N_l * sum_i f_i P_i``, ONE term per decoder layer ``l`` over the
    tokens of all its routed modules (MoLA's code concatenates their router logits), not one per module:
    at uniform routing each layer gives ``coef`` however many targets it has. Modules of a layer pool when
    they have the same number of experts; targets with one expert (outside ``moe_targets``) have no router
    and take no part. Reads and clears each layer's ``balance``; 0.0 when none has any."""
    pools: dict[tuple[int, int], list] = {}
    for layer in layers:
        if layer.balance is not None:
            pools.setdefault((layer.layer_index, layer.num_experts), []).append(layer.balance)
            layer.balance = None
    total = 0.0
    for parts in pools.values():
        total = total + parts[0][0] * pooled_switch_load_balance([stats for _, stats in parts])
    return total
