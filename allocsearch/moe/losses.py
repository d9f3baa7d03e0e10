"""Auxiliary routing losses: Switch load balance (MoLA), Poisson distinction and Normal balance (GraphLoRA)."""
from __future__ import annotations

import math

import torch


def switch_load_balance(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch-style balance in MoLA's normalisation: ``L = N * sum_i f_i P_i``.

    ``f_i``: share of the layer's top-k selections that went to expert i (sums to 1); ``P_i``: mean router
    probability of expert i over the tokens. Uniform routing gives 1.
    """
    n = probs.shape[-1]
    f = torch.bincount(index.reshape(-1), minlength=n).to(probs.dtype) / index.numel()
    return n * (f * probs.mean(0)).sum()


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p || q) along the last axis."""
    return (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(-1)


def poisson_target(lam: torch.Tensor, n: int) -> torch.Tensor:
    """GraphLoRA eq. (6): ``v_poisson(i) = L1norm(lambda^i e^-lambda / i!)`` for i = 1..N."""
    i = torch.arange(1, n + 1, device=lam.device, dtype=torch.float32)
    logp = i * lam.float().log() - lam.float() - torch.lgamma(i + 1)
    return torch.softmax(logp, dim=-1)  # exp(logp) / sum exp(logp), computed stably


def poisson_distinction(probs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """GraphLoRA eq. (7): ``L_poisson = KL(v_poisson || sort_desc(R(x)))``, averaged over tokens."""
    v_r = probs.sort(dim=-1, descending=True).values
    return _kl(poisson_target(lam, probs.shape[-1]), v_r).mean()


def normal_target(sigma: torch.Tensor, n: int) -> torch.Tensor:
    """GraphLoRA eq. (8): ``v_normal(i) = L1norm(exp(-(i - mu)^2 / 2 sigma^2))``, mu = N/2, i = 1..N."""
    i = torch.arange(1, n + 1, device=sigma.device, dtype=torch.float32)
    return torch.softmax(-((i - n / 2) ** 2) / (2 * sigma.float() ** 2), dim=-1)


def normal_balance(gates: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """GraphLoRA eq. (9): ``L_normal = KL(v_normal || v_a)``; ``v_a`` = each expert's cumulative top-K
    weight over the batch, normalised and sorted descending (gradient flows through this batch's gates)."""
    load = gates.sum(0)
    v_a = (load / load.sum().clamp_min(1e-12)).sort(descending=True).values
    return _kl(normal_target(sigma, gates.shape[-1]), v_a)


def softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y``: used to initialise positive parameters kept as softplus(raw)."""
    return y + math.log(-math.expm1(-y))
