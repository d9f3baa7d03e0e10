"""N LoRA experts of one wrapped Linear, computed batched.

``E_i(x) = B_i A_i dropout(x)`` (METHODS.md, "LoRA expert"). The experts are stored stacked,
``A = [A_1; ...; A_N]`` as one ``(N r) x d_in`` matrix and ``B = [B_1 ... B_N]`` as one ``d_out x (N r)``
matrix, so a mixture is "a wide LoRA with a sparse middle": one matmul into the ``N r`` space, the gate
weights (zero for unchosen experts, and the scaling ``s``) multiplied in there, one matmul out. That does
N/k times a top-k's adapter FLOPs but has no gathers and no Python loop; it wins while ``N r`` is small
next to ``d`` (measured by ``allocsearch bench layers``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAExperts(nn.Module):
    def __init__(self, num_experts: int, rank: int, in_features: int, out_features: int, *,
                 b_init_std: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.rank = num_experts, rank
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, num_experts * rank, device=device, dtype=dtype))
        # A: Kaiming-uniform as in peft/nn.Linear (fan_in = d_in for every expert block).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # B: zeros, so a fresh adapter leaves the model unchanged (OMoE "unit" needs a small B).
        if b_init_std > 0:
            nn.init.normal_(self.lora_B, std=b_init_std)
        else:
            nn.init.zeros_(self.lora_B)

    def project(self, x: torch.Tensor, dropout: nn.Module, extra: torch.Tensor | None = None):
        """``(A dropout(x), extra x)``: one fused matmul of ``[A; extra]`` when no dropout is active.

        ``extra`` is the router's weight (or GraphLoRA's W_in), which reads the un-dropped ``x``.
        """
        if extra is None:
            return F.linear(dropout(x), self.lora_A), None
        if isinstance(dropout, nn.Identity) or not self.training:
            out = F.linear(x, torch.cat([self.lora_A, extra.to(self.lora_A.dtype)], dim=0))
            return out.split([self.lora_A.shape[0], extra.shape[0]], dim=-1)
        return F.linear(dropout(x), self.lora_A), F.linear(x, extra.to(self.lora_A.dtype))

    def combine(self, z: torch.Tensor, weights: torch.Tensor | float) -> torch.Tensor:
        """``sum_i w_i B_i z_i``: z is ``(T, N r)``; ``weights`` is ``(T, N)`` (already times s) or a scalar."""
        if isinstance(weights, torch.Tensor):
            t = z.shape[0]
            z = (z.view(t, self.num_experts, self.rank) * weights.to(z.dtype).unsqueeze(-1)).view(t, -1)
        else:
            z = z * weights
        return F.linear(z, self.lora_B)

    def gram(self, z: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``G[t, i, j] = <e_i, e_j>`` for every token, in ``dtype``, via ``B_i^T B_j`` (r x r blocks):
        costs ``T (N r)^2``, never the ``T N d_out`` of forming the outputs."""
        n, r = self.num_experts, self.rank
        b = self.lora_B.to(dtype)
        m = (b.t() @ b).view(n, r, n, r)  # B_i^T B_j
        zf = z.to(dtype).view(-1, n, r)
        return torch.einsum("tia,iajb,tjb->tij", zf, m, zf)

    @torch.no_grad()
    def redundancy(self) -> float:
        """MoLA §5.1: mean Frobenius norm of ``B_i A_i - B_j A_j`` over expert pairs (0 for one expert).

        Computed through r-sized Gram matrices, never forming the d_out x d_in products.
        """
        n, r = self.num_experts, self.rank
        if n < 2:
            return 0.0
        a = self.lora_A.float().view(n, r, -1)
        b = self.lora_B.float().view(-1, n, r).permute(1, 0, 2)  # (N, d_out, r)
        ga = torch.einsum("irk,jsk->ijrs", a, a)  # A_i A_j^T
        gb = torch.einsum("ior,jos->ijrs", b, b)  # B_i^T B_j
        inner = torch.einsum("ijrs,ijrs->ij", ga, gb)  # <B_i A_i, B_j A_j>_F
        sq = inner.diagonal()
        dist2 = (sq[:, None] + sq[None, :] - 2 * inner).clamp_min(0)
        iu = torch.triu_indices(n, n, offset=1, device=dist2.device)
        return dist2[iu[0], iu[1]].sqrt().mean().item()
