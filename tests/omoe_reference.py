"""OMoE's textbook form, for the tests only: every expert's output e_i = B_i A_i x formed, and an explicit
(modified) Gram-Schmidt over the active experts, in float64. The layer itself never forms the e_i
(``gram_schmidt_weights`` on their r x r Gram blocks); these are what it is checked against."""
from __future__ import annotations

import torch


def norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    return (v.pow(2).sum(-1, keepdim=True) + eps * eps).sqrt()


def gram_schmidt(e: torch.Tensor, eps: float, tol: float = 0.0) -> torch.Tensor:
    """Orthonormalise ``e`` (T, k, d) along k, in order (modified Gram-Schmidt). ``tol``: a residual ``u_j``
    with ``||u_j|| < tol * ||e_j||`` adds nothing new: its ``q_j`` is 0, also for the later projections."""
    qs = []
    for j in range(e.shape[1]):
        u = e[:, j]
        for q in qs:
            u = u - (u * q).sum(-1, keepdim=True) * q
        keep = u.pow(2).sum(-1, keepdim=True) >= tol * tol * e[:, j].pow(2).sum(-1, keepdim=True)
        qs.append(torch.where(keep, u / norm(u, eps), torch.zeros_like(u)))
    return torch.stack(qs, dim=1)


def expert_outputs(experts, z: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Every expert's own output ``e_i = B_i A_i x`` as (T, N, d_out), from ``z = A x`` (T, N r)."""
    n, r = experts.num_experts, experts.rank
    b = experts.lora_B.detach().to(dtype).view(-1, n, r)  # (d_out, N, r)
    return torch.einsum("tnr,onr->tno", z.to(dtype).view(z.shape[0], n, r), b)


def omoe_delta(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's delta the textbook way: route, form the active experts' outputs, Gram-Schmidt them
    (float64, the layer's collinearity rule), keep their magnitude ("magnitude") or not ("unit"), mix."""
    z, gates, index = layer._route(x)
    e = expert_outputs(layer.experts, z)
    e = e.gather(1, index.unsqueeze(-1).expand(-1, -1, e.shape[-1]))
    o = layer.options
    q = gram_schmidt(e, o.eps, o.collinear_tol)
    if o.orthogonalization == "magnitude":
        q = q * norm(e, o.eps)
    return (layer.scaling * (gates.gather(1, index).double().unsqueeze(-1) * q).sum(1)).to(z.dtype)
