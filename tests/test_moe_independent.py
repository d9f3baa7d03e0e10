"""Layer outputs and auxiliary losses against numpy per-token loops written here, where the older tests
compare a fast path with a reference form written for the tests (GraphLoRA's tests/graphlora_reference.py,
OMoE's float64 Gram-Schmidt in tests/omoe_reference.py, LoRACoE's ``delta_unfused``) or only check a sign (GraphLoRA's aux loss > 0);
and LoRA dropout: on the experts' input in training only, never on the router's."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from allocsearch import AllocationConfig
from allocsearch.allocation.methods import get_method
from trial_helpers import np_softmax


def make_layer(method, *, d_in=12, d_out=10, experts=4, top_k=2, rank=3, alpha=6.0, dropout=0.0, options=None,
               layer_index=0, num_layers=1, seed=0, b_std=0.5):
    torch.manual_seed(seed)
    alloc = AllocationConfig.uniform(method, num_layers, experts=experts, top_k=top_k, rank=rank,
                                     dropout=dropout, targets=["q"], options=options)
    layer = get_method(method).layer_class()(
        nn.Linear(d_in, d_out), experts=experts, top_k=top_k, rank=rank, alpha=alpha, dropout=dropout,
        options=alloc.options, layer_index=layer_index, num_layers=num_layers, target="q")
    with torch.no_grad():
        layer.experts.lora_B.normal_(std=b_std)
    return layer


def x_in(t=7, d=12, seed=1):
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed))


def npy(t) -> np.ndarray:
    return t.detach().double().numpy()


def topk_gates(p: np.ndarray, k: int) -> tuple[np.ndarray, list[int]]:
    order = [int(i) for i in np.argsort(-p, kind="stable")[:k]]
    g = np.zeros_like(p)
    g[order] = p[order] / p[order].sum()
    return g, order


def expert(a, b, i, r):
    return b[:, i * r:(i + 1) * r] @ a[i * r:(i + 1) * r]


# ----------------------------------------------------------------------------------------------- GraphLoRA


def np_adjacency(n: int, edges: np.ndarray) -> np.ndarray:
    adj = np.eye(n + 1)
    for i in range(1, n + 1):
        adj[0, i] = adj[i, 0] = 1.0
    for i, j in edges:
        adj[i + 1, j + 1] = adj[j + 1, i + 1] = 1.0
    d = 1.0 / np.sqrt(adj.sum(1))
    return d[:, None] * adj * d[None, :]


def np_graph_logits(layer, x: np.ndarray) -> np.ndarray:
    """The 2-layer GCN over [token; experts] run for each token separately."""
    n = layer.num_experts
    adj = np_adjacency(n, layer.edges.numpy())
    emb, w1, readout = npy(layer.expert_emb), npy(layer.gcn1), npy(layer.readout)
    out = []
    for xt in x:
        h0 = np.vstack([np.maximum(npy(layer.token_in) @ xt, 0.0)[None], emb])  # (N+1, node_dim)
        pre = adj @ h0 @ w1
        if layer.gcn1_self is not None:
            pre = pre + h0 @ npy(layer.gcn1_self)
        h1 = np.maximum(pre, 0.0)
        h2 = adj @ h1 @ readout
        if layer.readout_self is not None:
            h2 = h2 + h1 @ npy(layer.readout_self)
        out.append(h2[1:, 0])
    return np.stack(out)


GL = {"gcn_hidden": 16, "node_dim": 8}


@pytest.mark.parametrize("beta, self_weight, layer_index", [(0.1, True, 0), (0.5, True, 1), (1.0, False, 2),
                                                           (0.5, False, 0)])
def test_graphlora_logits_and_delta_equal_a_per_token_gcn(beta, self_weight, layer_index):
    layer = make_layer("graphlora", experts=6, top_k=2, options={**GL, "edge_density": beta, "self_weight": self_weight},
                       layer_index=layer_index, num_layers=3)
    assert len(layer.edges) == round(beta * 15)
    x = x_in()
    np.testing.assert_allclose(npy(layer.adjacency), np_adjacency(6, layer.edges.numpy()), atol=1e-6)
    logits = np_graph_logits(layer, npy(x))
    np.testing.assert_allclose(npy(layer.router_logits(x @ layer.token_in.t())), logits, atol=1e-5, rtol=1e-4)
    a, b, r = npy(layer.experts.lora_A), npy(layer.experts.lora_B), 3
    if not self_weight:
        return  # experts with equal closed neighbourhoods tie (what the root weights fix): logits only
    ranked = -np.sort(-logits, axis=1)
    assert (ranked[:, 1] - ranked[:, 2] > 1e-6).all()  # top-2 unambiguous
    expected = []
    for t, xt in enumerate(npy(x)):
        g, order = topk_gates(np_softmax(logits[t]), 2)
        expected.append(sum(g[i] * layer.scaling * expert(a, b, i, r) @ xt for i in order))
    np.testing.assert_allclose(npy(layer.delta(x)), np.stack(expected), atol=1e-5)


def np_kl(p, q) -> float:
    return float(sum(pi * (math.log(pi) - math.log(max(qi, 1e-12))) for pi, qi in zip(p, q)))


def test_graphlora_aux_loss_value_is_the_weighted_poisson_plus_normal_kl():
    opts = {**GL, "edge_density": 0.5, "poisson_coef": 0.3, "normal_coef": 2.0, "lambda_init": 1.7,
            "sigma_init": 1.3}
    n, k = 5, 2
    layer = make_layer("graphlora", experts=n, top_k=k, options=opts)
    x = x_in(t=9)
    layer.train()
    layer(x)
    logits = np_graph_logits(layer, npy(x))
    lam = math.log1p(math.exp(layer.lambda_raw.item()))  # softplus
    sigma = math.log1p(math.exp(layer.sigma_raw.item()))
    assert lam == pytest.approx(1.7, rel=1e-5) and sigma == pytest.approx(1.3, rel=1e-5)
    pois = np.array([lam ** i * math.exp(-lam) / math.factorial(i) for i in range(1, n + 1)])
    pois /= pois.sum()
    norm = np.array([math.exp(-(i - n / 2) ** 2 / (2 * sigma ** 2)) for i in range(1, n + 1)])
    norm /= norm.sum()
    probs = [np_softmax(row) for row in logits]
    l_poisson = np.mean([np_kl(pois, sorted(p, reverse=True)) for p in probs])
    load = sum(topk_gates(p, k)[0] for p in probs)
    l_normal = np_kl(sorted(norm, reverse=True), sorted(load / load.sum(), reverse=True))  # both sorted
    assert layer.aux_loss.item() == pytest.approx(0.3 * l_poisson + 2.0 * l_normal, rel=1e-4)
    layer.eval()
    layer.aux_loss = None
    layer(x)
    assert layer.aux_loss is None  # no aux loss from evaluation forwards


# ----------------------------------------------------------------------------------------------- OMoE


def np_gram_schmidt_mixture(e: list[np.ndarray], g: list[float], eps: float, magnitude: bool) -> np.ndarray:
    qs = []
    for v in e:
        u = v.copy()
        for q in qs:
            u = u - (u @ q) * q
        qs.append(u / math.sqrt(u @ u + eps * eps))
    if magnitude:
        return sum(gi * math.sqrt(v @ v + eps * eps) * q for gi, v, q in zip(g, e, qs))
    return sum(gi * q for gi, q in zip(g, qs))


@pytest.mark.parametrize("mode", ["magnitude", "unit"])
@pytest.mark.parametrize("experts, top_k", [(2, 2), (4, 2), (4, 4), (3, 1)])
def test_omoe_delta_equals_per_token_gram_schmidt(mode, experts, top_k):
    layer = make_layer("omoe", experts=experts, top_k=top_k, options={"orthogonalization": mode, "placement": "all"})
    assert layer.orthogonal
    x = x_in()
    a, b, w = npy(layer.experts.lora_A), npy(layer.experts.lora_B), npy(layer.router)
    expected = []
    for xt in npy(x):
        g, order = topk_gates(np_softmax(w @ xt), top_k)  # router order: highest weight first
        e = [expert(a, b, i, 3) @ xt for i in order]
        expected.append(layer.scaling * np_gram_schmidt_mixture(e, [g[i] for i in order], layer.options.eps,
                                                                mode == "magnitude"))
    np.testing.assert_allclose(npy(layer.delta(x)), np.stack(expected), atol=1e-5, rtol=1e-4)


def test_omoe_outside_its_placement_is_a_plain_gated_mixture():
    layer = make_layer("omoe", experts=4, top_k=2, options={"placement": [1]}, layer_index=0, num_layers=3)
    assert not layer.orthogonal
    with torch.no_grad():
        layer.experts.lora_B.normal_(std=0.5)
    x = x_in()
    a, b, w = npy(layer.experts.lora_A), npy(layer.experts.lora_B), npy(layer.router)
    expected = []
    for xt in npy(x):
        g, order = topk_gates(np_softmax(w @ xt), 2)
        expected.append(sum(g[i] * layer.scaling * expert(a, b, i, 3) @ xt for i in order))
    np.testing.assert_allclose(npy(layer.delta(x)), np.stack(expected), atol=1e-5)


# ----------------------------------------------------------------------------------------------- LoRACoE


@pytest.mark.parametrize("scale", ["rank", "paper"])
def test_loracoe_fused_and_unfused_both_equal_numpy(scale):
    e, r = 3, 4
    layer = make_layer("loracoe", experts=e, top_k=e, rank=r, alpha=8.0, options={"composition_scale": scale})
    with torch.no_grad():
        layer.route.normal_(std=1.0)
    x = x_in()
    a, b, route = npy(layer.experts.lora_A), npy(layer.experts.lora_B), npy(layer.route)
    expected = []
    for xt in npy(x):
        g = sum(np_softmax(route[i * r:(i + 1) * r] @ xt) for i in range(e)) / e
        g = g * r if scale == "rank" else g
        expected.append(layer.scaling * b @ (g * (a @ xt)))
    expected = np.stack(expected)
    np.testing.assert_allclose(npy(layer.delta(x)), expected, atol=1e-5)
    np.testing.assert_allclose(npy(layer.delta_unfused(x)), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("method", ["mola", "graphlora", "omoe"])
def test_lora_dropout_hits_the_expert_input_in_training_only(method):
    """Training: A sees dropout(x) (the mask re-drawn here from the same seed), the router sees x.
    Evaluation: no dropout at all."""
    p = 0.5
    opts = {"graphlora": GL, "omoe": {"placement": [5]}}.get(method)  # omoe: vanilla mixture in layer 0
    layer = make_layer(method, experts=4, top_k=2, dropout=p, options=opts, num_layers=6)
    x = x_in()
    logits_of = (lambda xx: np_graph_logits(layer, xx)) if method == "graphlora" else (
        lambda xx: xx @ npy(layer.router).T)
    a, b = npy(layer.experts.lora_A), npy(layer.experts.lora_B)

    def expected(x_experts):
        out = []
        for xt, xe, lg in zip(npy(x), x_experts, logits_of(npy(x))):
            g, order = topk_gates(np_softmax(lg), 2)
            out.append(sum(g[i] * layer.scaling * expert(a, b, i, 3) @ xe for i in order))
        return np.stack(out)

    layer.eval()
    np.testing.assert_allclose(npy(layer.delta(x)), expected(npy(x)), atol=1e-5)
    layer.train()
    torch.manual_seed(7)
    got = npy(layer.delta(x))
    torch.manual_seed(7)
    dropped = npy(torch.nn.functional.dropout(x, p, training=True))
    assert 0 < (dropped == 0).mean() < 1
    np.testing.assert_allclose(got, expected(dropped), atol=1e-5)
    assert not np.allclose(got, expected(npy(x)), atol=1e-3)
