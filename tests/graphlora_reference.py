"""GraphLoRA's router the textbook way, for the tests only: the per-token GCN over every node of every
token's graph (the layer computes the same logits without forming the expert nodes' activations twice)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def router_logits(router, tok: torch.Tensor) -> torch.Tensor:
    """The expert logits of ``router`` (a GraphRouter) for tokens ``tok`` (T, node_dim): H0 = [relu(tok);
    expert embeddings], H1 = relu(Â H0 W1 (+ H0 S1)), out = Â H1 W2 (+ H1 S2), the expert nodes' scores."""
    adj = router.adjacency.to(tok.dtype)
    emb = router.expert_emb.unsqueeze(0).expand(tok.shape[0], -1, -1)
    h0 = torch.cat([F.relu(tok).unsqueeze(1), emb], dim=1)  # (T, N+1, node_dim)
    if router.gcn1_self is None:
        h1 = F.relu(adj @ h0 @ router.gcn1)
        out = adj @ h1 @ router.readout
    else:
        h1 = F.relu(adj @ h0 @ router.gcn1 + h0 @ router.gcn1_self)
        out = adj @ h1 @ router.readout + h1 @ router.readout_self
    return out[:, 1:].squeeze(-1)
