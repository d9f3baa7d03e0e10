"""LoRACoE: composition of rank-level experts (seeds/loracoe.txt §3.2, App. C).

One rank-r LoRA split into rank-1 pieces ``B_j A_j``; E experts each give a distribution over the r ranks:
    G_i(x) = softmax_over_r(W_route_i x)                    i = 1..E               (§3.2)
    h = W0 x + s * B ( (1/E) sum_i G_i(x) ⊙ (A x) )                                 (LoRACoE(x))
Fused form (App. C): one matmul of ``[A; W_route]`` (``r(E+1) x d_in``) with x, then split.
``composition_scale="rank"`` (default) multiplies the weights by r so that a uniform router equals plain
LoRA: the switch from warm-up to joint training, and "inference without router", keep the magnitude.
Two-phase training: ``set_phase("warmup")`` trains plain LoRA (router off and frozen), ``"joint"`` trains
both; ``use_router = False`` at inference is the paper's "inference without router" (Table 2).
Trainable parameters per module: ``r (d_in + d_out + d_in E)`` (App. B).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from allocsearch.moe.base import MoELoRALayer
from allocsearch.moe.experts import LoRAExperts


class LoRACoELinear(MoELoRALayer):
    def __init__(self, base: nn.Linear, **kwargs):
        super().__init__(base, **kwargs)
        # one LoRA of rank r: stored as a single "expert" of rank r
        self.experts = LoRAExperts(1, self.rank, self.in_features, self.out_features, **self._factory)
        self.route = nn.Parameter(torch.empty(self.num_experts * self.rank, self.in_features, **self._factory))
        nn.init.normal_(self.route, std=self.options.router_init_std)  # small: near-uniform, symmetry broken
        self.use_router = True
        self._register_load_counts(self.rank, base.weight.device)  # composition weight mass per rank

    def set_phase(self, phase: str) -> None:
        if phase not in ("warmup", "joint"):
            raise ValueError(f"LoRACoE phase must be 'warmup' or 'joint', got {phase!r}")
        self.use_router = phase == "joint"
        self.route.requires_grad_(self.use_router)

    def _weights(self, logits: torch.Tensor) -> torch.Tensor:
        """``(1/E) sum_i softmax_r(W_route_i x)`` (times r under the "rank" scale), shape (T, r)."""
        g = torch.softmax(logits.float().view(-1, self.num_experts, self.rank), dim=-1).mean(1)
        if self.track_load:
            with torch.no_grad():
                self.load_counts += self._real(g).sum(0).to(self.load_counts.dtype)  # weight mass per rank
        return g * self.rank if self.options.composition_scale == "rank" else g

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_router:
            return self.experts.combine(self.experts.project(x, self.lora_dropout)[0], self.scaling)
        a, logits = self.experts.project(x, self.lora_dropout, self.route)  # fused [A; W_route] x
        return F.linear(a * (self._weights(logits) * self.scaling).to(a.dtype), self.experts.lora_B)

    def delta_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """Reference form of App. C Table 5: a separate matmul per expert router and the rank-1 outer
        products ``B_j A_j x`` materialised as ``(T, r, d_out)``. Same value as ``delta``; kept for tests
        and the benchmark."""
        a = F.linear(self.lora_dropout(x), self.experts.lora_A)  # (T, r)
        logits = torch.cat([F.linear(x, w) for w in self.route.view(self.num_experts, self.rank, -1)], -1)
        outer = a.unsqueeze(-1) * self.experts.lora_B.t().unsqueeze(0)  # (T, r, d_out): a_j B_j
        w = (self._weights(logits) * self.scaling).to(a.dtype)
        return (w.unsqueeze(-1) * outer).sum(1)

    def redundancy(self) -> float:
        return 0.0  # one shared LoRA: experts differ only in their routers
