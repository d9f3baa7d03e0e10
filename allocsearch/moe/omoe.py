"""OMoE: orthogonal mixture of LoRA experts (seeds/omoe.txt §3; reconstruction after MOORE).

Router ``g = softmax(W_g x)`` (soft routing by default, top-k supported). The k active experts' outputs
``e_j = B_j A_j x`` are orthogonalised per token by Gram-Schmidt in router order (highest weight first):
    u_1 = e_1,  u_j = e_j - sum_{i<j} <e_j, q_i> q_i,  q_j = u_j / ||u_j||          (eq. 5, Gram-Schmidt)
    "unit":      h = W0 x + s * sum_j g_j q_j           (the paper's form: orthonormal, Stiefel, eq. 4)
    "magnitude": h = W0 x + s * sum_j g_j ||e_j|| q_j   (default: keeps each expert's size)
Zero-init hazard: with B = 0 every e_j is 0 and q_j = 0/0. Norms are computed as sqrt(||u||^2 + eps^2),
so q_j = 0 and all gradients stay finite at step 0. "magnitude" then leaves a fresh adapter's output
unchanged; "unit" needs B initialised small and non-zero (``b_init_std``) to have any direction at all.
Near-collinear experts (expert collapse, what OMoE targets): the layer computes the orthogonalisation
from the k x k Gram matrix in float64 (in float32 its cancellation gave outputs of 2.9e3 for a true norm of
1.4 at a 3e-4 relative difference), and a residual with ``||u_j|| < collinear_tol * ||e_j||`` (default
1e-4) counts as nothing new: ``q_j = 0``. A float32 layer cannot resolve the direction of a smaller
residual anyway (its error is ~1e-7 / (||u_j|| / ||e_j||)). So the output stays bounded by
``s * sum_j g_j m_j`` and matches the explicit float64 Gram-Schmidt with the same rule (tests/
test_fidelity_mola_omoe.py); a dropped expert still gets its router gradient through the others' weights.
Layers outside ``placement`` (paper Tables 4-5: levels low / middle / high = layers 1-10 / 11-20 / 21-32 of
32, scaled to the depth: ``allocsearch.allocation.shapes.levels``) get vanilla MoE experts.
"""
from __future__ import annotations

import torch
from torch import nn

from allocsearch.moe.base import MoELoRALayer
from allocsearch.moe.experts import LoRAExperts
from allocsearch.moe.mola import make_router
from allocsearch.moe.routers import topk_route


def gram_schmidt_weights(gram: torch.Tensor, coef: torch.Tensor, eps: float, magnitude: bool,
                         tol: float = 0.0) -> torch.Tensor:
    """Weights ``w`` (T, k) with ``sum_j coef_j m_j q_j = sum_m w_m e_m``, from the Gram matrix alone.

    Gram-Schmidt is linear in the e's: ``q_j = sum_m W[j, m] e_m`` with W lower-triangular, and every
    inner product it needs is ``c^T G c'`` with ``G[t] = E E^T`` (k x k per token). So the orthogonalised
    mixture is just another gating of the experts, and the (T, k, d_out) outputs are never formed.
    ``m_j = ||e_j||`` ("magnitude") or 1 ("unit"); norms are sqrt(. + eps^2),
    and ``tol`` drops a residual below ``tol * ||e_j||`` as there.

    Numerics: ``||u_j||^2 = c^T G c`` cancels down from ``||e_j||^2``, so its relative error is about
    ``unit roundoff / (||u_j|| / ||e_j||)^2``; in float32 that is garbage once two experts differ by ~3e-4.
    Pass ``gram`` in float64 (the layer does): the k x k work is negligible next to the matmuls, and with
    ``tol`` = 1e-4 every kept residual is resolved to ~1e-8 relative. The weights are at most ~1 / tol.
    """
    t, k, _ = gram.shape
    eye = torch.eye(k, device=gram.device, dtype=gram.dtype).expand(t, k, k)
    sq = gram.diagonal(dim1=1, dim2=2)  # ||e_j||^2
    rows = []
    for j in range(k):
        c = eye[:, j]  # u_j = e_j
        for w in rows:  # u_j -= <u_j, q_i> q_i  (modified Gram-Schmidt)
            c = c - (torch.bmm(c.unsqueeze(1), gram).squeeze(1) * w).sum(-1, keepdim=True) * w
        norm2 = (torch.bmm(c.unsqueeze(1), gram).squeeze(1) * c).sum(-1, keepdim=True).clamp_min(0)
        keep = norm2 >= tol * tol * sq[:, j:j + 1]  # else collinear: q_j = 0 (the division stays finite)
        rows.append(torch.where(keep, c / (norm2 + eps * eps).sqrt(), torch.zeros_like(c)))  # q_j = u_j / ||u_j||
    weights = torch.stack(rows, dim=1)  # (T, k, k): q_j = sum_m W[j, m] e_m
    if magnitude:
        coef = coef * (sq.clamp_min(0) + eps * eps).sqrt()  # ||e_j||
    return torch.bmm(coef.unsqueeze(1), weights).squeeze(1)


class OMoELinear(MoELoRALayer):
    def __init__(self, base: nn.Linear, **kwargs):
        super().__init__(base, **kwargs)
        o = self.options
        self.orthogonal = self.layer_index in o.layers(self.num_layers)
        b_std = o.b_init_std if self.orthogonal else 0.0
        self.experts = LoRAExperts(self.num_experts, self.rank, self.in_features, self.out_features,
                                   b_init_std=b_std, **self._factory)
        self.router = make_router(self.num_experts, self.in_features, self._factory)

    def _route(self, x: torch.Tensor):
        z, logits = self.experts.project(x, self.lora_dropout, self.router)
        if self.router is None:
            ones = torch.ones(x.shape[0], 1, device=x.device)
            return z, ones, torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        route = topk_route(logits, self.top_k)
        self._after_routing(route, self.options.load_balance_coef)
        return z, route.gates, route.index

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z, gates, index = self._route(x)
        if not self.orthogonal:
            return self.experts.combine(z, gates * self.scaling)  # vanilla MoE layer
        gram = self.experts.gram(z, torch.float64)  # (T, N, N): <e_i, e_j>; fp32 loses near-collinear experts
        gram = gram.gather(1, index.unsqueeze(-1).expand(-1, -1, gram.shape[-1]))
        gram = gram.gather(2, index.unsqueeze(1).expand(-1, index.shape[1], -1))  # active, router order
        o = self.options
        w = gram_schmidt_weights(gram, gates.gather(1, index).double(), o.eps, o.orthogonalization == "magnitude",
                                 o.collinear_tol)
        dense = torch.zeros_like(gates).scatter(1, index, w.to(gates.dtype))  # back to expert order
        return self.experts.combine(z, dense * self.scaling)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", orthogonal={self.orthogonal}"
