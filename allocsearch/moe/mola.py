"""MoLA: layer-wise LoRA expert allocation (Gao et al. 2024; seeds/mola-and-dora-notes.txt).

Every wrapped Linear t of layer j has its own ``N_j`` experts and router ``W_r`` (MoLA eq. 3-4):
    S(x) = TopK(softmax(W_r x), k) / sum TopK(...)                                   (3)
    h = W0 x + sum_{i in topk} S_i(x) * s * B_i A_i x                                (4)
With one expert this is plain LoRA (no router): that is how MixLoRA puts LoRA on attention.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from allocsearch.moe.base import MoELoRALayer
from allocsearch.moe.experts import LoRAExperts
from allocsearch.moe.routers import topk_route


class MoLALinear(MoELoRALayer):
    def __init__(self, base: nn.Linear, **kwargs):
        super().__init__(base, **kwargs)
        self.experts = LoRAExperts(self.num_experts, self.rank, self.in_features, self.out_features,
                                   **self._factory)
        self.router = make_router(self.num_experts, self.in_features, self._factory)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z, logits = self.experts.project(x, self.lora_dropout, self.router)  # [A; W_r] x, one matmul
        if self.router is None:
            return self.experts.combine(z, self.scaling)  # s * B A x
        route = topk_route(logits, self.top_k)  # eq. (3)
        self._after_routing(route, self.options.load_balance_coef)
        return self.experts.combine(z, route.gates * self.scaling)  # eq. (4)


def make_router(num_experts: int, in_features: int, factory: dict) -> nn.Parameter | None:
    """A bias-free router ``W_r: N x d_in`` initialised like ``nn.Linear``; None for a single expert."""
    if num_experts == 1:
        return None
    weight = nn.Parameter(torch.empty(num_experts, in_features, **factory))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight
