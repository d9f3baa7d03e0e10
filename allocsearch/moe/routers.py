"""Softmax routers: top-k with renormalisation (MoLA eq. 3) and soft routing (k = N)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Route(NamedTuple):
    gates: torch.Tensor  # (T, N) fp32: renormalised top-k weights, zero for unchosen experts
    probs: torch.Tensor  # (T, N) fp32: the full softmax p = softmax(W_r x)
    index: torch.Tensor  # (T, k): chosen experts, highest weight first ("router order")


def topk_route(logits: torch.Tensor, k: int) -> Route:
    """MoLA eq. (3): ``S_i = TopK(softmax(W_r x), k)_i / sum TopK(...)``, softmax in fp32.

    With ``k == N`` this is soft routing (LoRAMoE's dense router, OMoE's default): gates are the softmax.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = probs.topk(k, dim=-1)  # sorted, highest first
    if k == probs.shape[-1]:
        return Route(probs, probs, index)
    gates = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
    return Route(gates, probs, index)


def expert_counts(index: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How many top-k slots each expert received: ``bincount(index, minlength=N)`` as ``dtype``, on index's
    device. Summed with ``index_add_``, which runs on every device (bincount has no meta kernel)."""
    flat = index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=dtype, device=index.device)
    return counts.index_add_(0, flat, torch.ones(flat.shape, dtype=dtype, device=index.device))
