"""GraphLoRA (GMoE): a graph router over one token node and N expert nodes (seeds/graphlora.txt §3).

Graph: node 0 is the token, nodes 1..N the experts. The token links to every expert; expert-expert edges
are random with edge density ``beta`` (edges / N(N-1)/2), drawn once from a seed and fixed; self-loops
are added and the adjacency normalised as in GCN, ``Â = D^-1/2 (A + I) D^-1/2``.
Node features: learned expert embeddings (Glorot init); the token node gets ``relu(W_in x)``.
    H1 = relu(Â H0 W1 + H0 S1),  H2 = Â H1 W2 + H1 S2       (2-layer GCN, eq. 2-3; S = root weights)
    logits_i = F(H2[expert i]),  R = softmax(logits)        (projection F: hidden -> 1, eq. 4)
The second GCN layer is linear and F maps to one number, so only the products ``W2 F`` and ``S2 F``
(``hidden``-vectors) affect the router: we parametrise those products directly (``readout``,
``readout_self``) instead of two ``hidden x hidden`` matrices that would add ~2 hidden^2 trainable
parameters per wrapped Linear without changing what the router can express.
    h = W0 x + sum_{i in topK} R_i / sum_topK R * E_i(x)    (eq. 5; E_i the scaled LoRA expert)
The root weights S are our addition (option ``self_weight``, default on): with Â alone, experts whose
closed neighbourhoods are equal (every expert at beta = 1, twin leaves) get identical rows of Â and so
identical logits for every token. With S they stay distinguishable.
Computed for all tokens at once without building per-token graphs:
  * layer 1: ``Â H0 W1 = Â[:, 0] ⊗ (tok W1) + Â[:, 1:] (Emb W1)``, the second term (and the experts'
    ``H0 S1 = Emb S1``) shared by all tokens: one fused multiply-add per token;
  * layer 2 + projection: ``(Â H1 W2 + H1 S2) F = Â (H1 W2F) + H1 S2F``: two matrix-vector products.
Aux losses (training): ``poisson_coef * L_poisson + normal_coef * L_normal`` (eqs. 6-9, paper 0.005 and 8),
with lambda and sigma learned and kept positive through softplus (sigma starts at N/2 as in the authors'
code unless ``sigma_init`` is set). ``L_normal`` compares the sorted bell with the sorted activation
frequency, cumulated over training in the persistent buffer ``activation_total`` (saved with the adapter).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from allocsearch.moe.base import MoELoRALayer
from allocsearch.moe.experts import LoRAExperts
from allocsearch.moe.losses import normal_balance, poisson_distinction, softplus_inverse
from allocsearch.moe.routers import topk_route


def expert_edges(num_experts: int, density: float, seed: int, device=None) -> torch.Tensor:
    """Random undirected expert-expert edges, ``round(beta * N(N-1)/2)`` of them, as (E, 2) index pairs on
    ``device``. Drawn by a CPU generator: the same graph from the same seed whatever the device."""
    pairs = torch.triu_indices(num_experts, num_experts, offset=1).t()
    count = round(density * len(pairs))
    gen = torch.Generator().manual_seed(seed)
    return pairs[torch.randperm(len(pairs), generator=gen)[:count]].to(device)


def normalized_adjacency(num_experts: int, edges: torch.Tensor) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` over node 0 (token) and nodes 1..N (experts)."""
    n = num_experts + 1
    adj = torch.eye(n, device=edges.device)
    adj[0, 1:] = adj[1:, 0] = 1.0  # token <-> every expert
    if len(edges):
        adj[edges[:, 0] + 1, edges[:, 1] + 1] = adj[edges[:, 1] + 1, edges[:, 0] + 1] = 1.0
    d = adj.sum(1).rsqrt()
    return d[:, None] * adj * d[None, :]


class GraphRouter:
    """The graph router's parameters, logits and aux losses, set up on a module by ``_build_graph_router``:
    shared by the per-Linear form (``GraphLoRALinear``, our variant) and the paper's FFN-block form
    (``allocsearch.moe.ffn_block.GraphLoRAFFNBlock``). The module keeps ``options`` and ``layer_index``."""

    def _build_graph_router(self, n: int, in_features: int, fac: dict) -> None:
        o = self.options
        seed = o.graph_seed + 1000 * self.layer_index  # fixed per layer, reproducible from the config
        self.register_buffer("edges", expert_edges(n, o.edge_density, seed, fac["device"]))
        self.register_buffer("adjacency", normalized_adjacency(n, self.edges).to(fac["dtype"]))
        self.token_in = nn.Parameter(torch.empty(o.node_dim, in_features, **fac))  # W_in
        self.expert_emb = nn.Parameter(torch.empty(n, o.node_dim, **fac))
        self.gcn1 = nn.Parameter(torch.empty(o.node_dim, o.gcn_hidden, **fac))
        self.readout = nn.Parameter(torch.empty(o.gcn_hidden, 1, **fac))  # W2 F
        if o.self_weight:
            self.gcn1_self = nn.Parameter(torch.empty(o.node_dim, o.gcn_hidden, **fac))  # S1
            self.readout_self = nn.Parameter(torch.empty(o.gcn_hidden, 1, **fac))  # S2 F
        else:
            self.gcn1_self = self.readout_self = None
        nn.init.kaiming_uniform_(self.token_in, a=math.sqrt(5))
        for w in (self.expert_emb, self.gcn1, self.gcn1_self):
            if w is not None:
                nn.init.xavier_uniform_(w)  # Glorot
        for w in (self.readout, self.readout_self):  # as the product of two Glorot matrices would be
            if w is not None:
                nn.init.normal_(w, std=math.sqrt(2.0 / (o.gcn_hidden + 1)))
        self.lambda_raw = nn.Parameter(torch.tensor(softplus_inverse(o.lambda_init), **fac))
        sigma = n / 2 if o.sigma_init is None else o.sigma_init  # the authors' code: N/2
        self.sigma_raw = nn.Parameter(torch.tensor(softplus_inverse(sigma), **fac))
        # v_a's history: each expert's top-K weight summed over every training forward so far (detached).
        # A persistent buffer, so it is saved with the adapter and training resumes with the same profile.
        self.register_buffer("activation_total", torch.zeros(n, dtype=torch.float32, device=fac["device"]))

    @property
    def poisson_lambda(self) -> torch.Tensor:
        return F.softplus(self.lambda_raw)

    def graph_aux_loss(self, route) -> torch.Tensor:
        """``poisson_coef * L_poisson + normal_coef * L_normal`` of one training forward; adds this batch's
        top-K weights to the running activation total (after using the old total as v_a's history)."""
        o = self.options
        loss = (o.poisson_coef * poisson_distinction(route.probs, self.poisson_lambda)
                + o.normal_coef * normal_balance(route.gates, self.normal_sigma, self.activation_total))
        with torch.no_grad():
            self.activation_total += route.gates.detach().sum(0).to(self.activation_total.dtype)
        return loss

    @property
    def normal_sigma(self) -> torch.Tensor:
        return F.softplus(self.sigma_raw)

    def router_logits(self, tok: torch.Tensor) -> torch.Tensor:
        """Expert logits from the token features ``tok = W_in x`` (pre-activation), shape (T, N)."""
        adj = self.adjacency.to(tok.dtype)
        h0 = F.relu(tok)  # the token node's features
        h0w1_token = h0 @ self.gcn1  # (T, hidden): the token node's H0 W1
        shared = adj[:, 1:] @ (self.expert_emb @ self.gcn1)  # (N+1, hidden): expert part of Â H0 W1
        if self.gcn1_self is None:
            h1 = torch.addcmul(shared, adj[:, :1].unsqueeze(0), h0w1_token.unsqueeze(1)).relu_()
            return (h1 @ self.readout.squeeze(-1)) @ adj[1:].t()
        # + H0 S1: the experts' rows are constant (Emb S1), the token's row is h0 S1
        shared = shared + F.pad(self.expert_emb @ self.gcn1_self, (0, 0, 1, 0))
        first = torch.addcmul(shared, adj[:, :1].unsqueeze(0), h0w1_token.unsqueeze(1))
        first[:, 0] += h0 @ self.gcn1_self
        # (T, N+1, hidden) is the one big tensor: one fused multiply-add, ReLU in place
        h1 = first.relu_()
        scores = h1 @ torch.cat([self.readout, self.readout_self], dim=1)  # (T, N+1, 2): H1 W2F, H1 S2F
        return scores[..., 0] @ adj[1:].t() + scores[:, 1:, 1]  # Â rows at the experts + root term

    def graph_logits(self, tok: torch.Tensor) -> torch.Tensor:
        """``router_logits``, recomputed in backward when ``recompute_router`` is on (training)."""
        if self.options.recompute_router and self.training and torch.is_grad_enabled():
            return checkpoint(self.router_logits, tok, use_reentrant=False)
        return self.router_logits(tok)


class GraphLoRALinear(GraphRouter, MoELoRALayer):
    """GraphLoRA with its own graph router on each wrapped Linear (our variant; the paper's placement is
    one router per FFN block: ``allocation.router_scope: ffn_block``)."""

    def __init__(self, base: nn.Linear, **kwargs):
        super().__init__(base, **kwargs)
        self.experts = LoRAExperts(self.num_experts, self.rank, self.in_features, self.out_features,
                                   **self._factory)
        self._build_graph_router(self.num_experts, self.in_features, self._factory)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z, tok = self.experts.project(x, self.lora_dropout, self.token_in)  # [A; W_in] x, one matmul
        logits = self.graph_logits(tok)
        route = topk_route(logits, self.top_k)
        real = self._after_routing(route)  # the non-padding tokens' routing, for the losses
        if self.training:
            self.aux_loss = self.graph_aux_loss(real)
        return self.experts.combine(z, route.gates * self.scaling)
