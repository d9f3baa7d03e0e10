"""Auxiliary routing losses: Switch load balance (MoLA), Poisson distinction and Normal balance (GraphLoRA)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from allocsearch.moe.routers import expert_counts


def switch_load_balance(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch-style balance in MoLA's normalisation: ``L = N * sum_i f_i P_i``.

    ``f_i``: share of the layer's top-k selections that went to expert i (sums to 1); ``P_i``: mean router
    probability of expert i over the tokens. Uniform routing gives 1.
    """
    return pooled_switch_load_balance([switch_stats(probs, index)])


class SwitchStats(NamedTuple):
    """One module's part of its decoder layer's Switch loss (summed over its tokens, so parts pool)."""

    counts: torch.Tensor  # (N,) top-k selections per expert (no gradient)
    probs_sum: torch.Tensor  # (N,) router probabilities summed over the tokens (carries the gradient)
    tokens: int


def switch_stats(probs: torch.Tensor, index: torch.Tensor) -> SwitchStats:
    return SwitchStats(expert_counts(index, probs.shape[-1], probs.dtype), probs.sum(0), probs.shape[0])


def pooled_switch_load_balance(parts: list[SwitchStats]) -> torch.Tensor:
    """MoLA's per-layer loss over several modules: their tokens concatenated, as MoLA's code concatenates
    the router logits of all target modules of a layer. ``f_i`` = share of all the modules' top-k picks
    that went to expert i, ``P_i`` = mean probability over all their tokens; ``L = N sum_i f_i P_i`` (1 at
    uniform routing however many modules pool). The parts must have the same N."""
    counts = sum(p.counts for p in parts)
    probs_sum = sum(p.probs_sum for p in parts)
    tokens = sum(p.tokens for p in parts)
    f = counts / counts.sum().clamp_min(1)
    return counts.shape[0] * (f * probs_sum / tokens).sum()


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


def normal_balance(gates: torch.Tensor, sigma: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """GraphLoRA eq. (9): ``L_normal = KL(sort_desc(v_normal) || sort_desc(v_a))``.

    ``v_a`` is the activation frequency vector: each expert's top-K weight cumulated over training, i.e.
    ``history`` (the detached running total of earlier batches, or None) plus this batch's ``gates.sum(0)``
    (which carries the gradient), L1-normalised. Both vectors are sorted descending (as the authors' code
    does): the loss compares the *profile* of the load with a bell, whichever expert is which. Sorting only
    ``v_a`` would compare a decreasing profile with a bell peaked in the middle, whose minimum over sorted
    loads is near uniform: the opposite of the intent.
    """
    load = gates.sum(0)
    if history is not None:
        load = history.detach().to(load.dtype) + load
    v_a = (load / load.sum().clamp_min(1e-12)).sort(descending=True).values
    target = normal_target(sigma, gates.shape[-1]).sort(descending=True).values
    return _kl(target, v_a)


def softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = y``: used to initialise positive parameters kept as softplus(raw)."""
    return y + math.log(-math.expm1(-y))
