"""The math under the MoE-LoRA layers, checked against hand computations (numpy / plain loops):
routers, auxiliary losses, Gram-Schmidt, the stacked LoRA experts and GraphLoRA's graph; plus BERT with a
trained head and injection errors. The layers themselves: test_moe_layers.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from allocsearch import AllocationConfig, AllocationError, preset
from allocsearch.allocation.methods import get_method
from allocsearch.moe import inject, load_adapter
from allocsearch.moe.experts import LoRAExperts
from allocsearch.moe.graphlora import GraphLoRALinear, expert_edges, normalized_adjacency
from allocsearch.moe.losses import (normal_balance, normal_target, poisson_distinction, poisson_target,
                                    switch_load_balance)
from allocsearch.moe.mola import MoLALinear
from allocsearch.moe.omoe import OMoELinear, gram_schmidt_weights
from omoe_reference import expert_outputs, gram_schmidt
from allocsearch.moe.routers import topk_route
from conftest import tiny_bert, tiny_llama


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


# ----------------------------------------------------------------------------------- top-k router
@pytest.mark.parametrize("n,k", [(6, 1), (6, 2), (6, 3), (8, 2), (5, 4)])
def test_topk_route_matches_numpy(n, k):
    logits = torch.randn(20, n, generator=torch.Generator().manual_seed(n * 10 + k)) * 2
    route = topk_route(logits, k)
    assert route.gates.dtype == route.probs.dtype == torch.float32
    assert route.index.shape == (20, k)
    probs = _softmax(logits.double().numpy())
    np.testing.assert_allclose(route.probs.numpy(), probs, atol=1e-6)
    for t in range(20):
        order = sorted(range(n), key=lambda i: -probs[t, i])[:k]
        assert route.index[t].tolist() == order  # the top-k, highest first
        expected = np.zeros(n)
        chosen = probs[t, order]
        expected[order] = chosen / chosen.sum()
        np.testing.assert_allclose(route.gates[t].numpy(), expected, atol=1e-6)
        assert int((route.gates[t] != 0).sum()) == k
    torch.testing.assert_close(route.gates.sum(-1), torch.ones(20))


def test_topk_route_with_k_equal_n_is_the_softmax():
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    route = topk_route(logits, 4)
    np.testing.assert_allclose(route.gates.numpy(), _softmax(logits.double().numpy()), atol=1e-6)
    assert (route.gates > 0).all()
    assert (route.index == route.probs.argsort(-1, descending=True)).all()


def test_topk_route_bf16_logits_give_fp32_gates():
    logits = torch.randn(12, 6, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    route = topk_route(logits, 2)
    assert route.gates.dtype == torch.float32 and route.probs.dtype == torch.float32
    np.testing.assert_allclose(route.probs.numpy(), _softmax(logits.double().numpy()), atol=1e-6)
    torch.testing.assert_close(route.gates.sum(-1), torch.ones(12))


# ----------------------------------------------------------------------------------- losses
def test_switch_load_balance_hand_case():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    index = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    # f = (3/8, 3/8, 2/8); P = (1.5/4, 1.3/4, 1.2/4); L = 3 * sum f P = 1.0125
    assert switch_load_balance(probs, index).item() == pytest.approx(1.0125, abs=1e-6)
    # everything to expert 0 (top-1): f = (1, 0, 0), P_0 = 0.375 -> 3 * 0.375
    assert switch_load_balance(probs, torch.zeros(4, 1, dtype=torch.long)).item() == pytest.approx(1.125)


def test_switch_load_balance_uniform_is_one():
    probs = torch.full((3, 3), 1 / 3)
    assert switch_load_balance(probs, torch.tensor([[0], [1], [2]])).item() == pytest.approx(1.0)
    assert switch_load_balance(probs, torch.tensor([[0, 1], [1, 2], [2, 0]])).item() == pytest.approx(1.0)


def _poisson(lam: float, n: int) -> list[float]:
    v = [lam ** i * math.exp(-lam) / math.factorial(i) for i in range(1, n + 1)]
    return [x / sum(v) for x in v]


def _normal(sigma: float, n: int) -> list[float]:
    v = [math.exp(-((i - n / 2) ** 2) / (2 * sigma ** 2)) for i in range(1, n + 1)]
    return [x / sum(v) for x in v]


@pytest.mark.parametrize("lam,n", [(1.0, 4), (1.7, 5), (3.2, 8)])
def test_poisson_target_and_distinction_by_hand(lam, n):
    np.testing.assert_allclose(poisson_target(torch.tensor(lam), n).numpy(), _poisson(lam, n), atol=1e-6)
    probs = torch.softmax(torch.randn(7, n, generator=torch.Generator().manual_seed(n)), -1)
    per_token = [_kl(_poisson(lam, n), sorted(row, reverse=True)) for row in probs.double().tolist()]
    got = poisson_distinction(probs, torch.tensor(lam))
    assert got.item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-5, abs=1e-6)


def test_poisson_distinction_is_zero_at_the_target_and_differentiable_in_lambda():
    lam = torch.tensor(2.0, requires_grad=True)
    target = torch.tensor(_poisson(2.0, 6), dtype=torch.float32)
    probs = target[torch.tensor([3, 0, 5, 1, 4, 2])].repeat(3, 1)  # a permutation: sorting undoes it
    loss = poisson_distinction(probs, lam)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss2 = poisson_distinction(torch.full((2, 6), 1 / 6), lam)
    loss2.backward()
    assert lam.grad is not None and torch.isfinite(lam.grad) and lam.grad != 0


@pytest.mark.parametrize("sigma,n", [(1.0, 4), (1.3, 6), (2.5, 8)])
def test_normal_target_and_balance_by_hand(sigma, n):
    np.testing.assert_allclose(normal_target(torch.tensor(sigma), n).numpy(), _normal(sigma, n), atol=1e-6)
    gates = torch.softmax(torch.randn(9, n, generator=torch.Generator().manual_seed(n)) * 2, -1)
    load = [sum(gates[t, i].item() for t in range(9)) for i in range(n)]
    v_a = sorted((x / sum(load) for x in load), reverse=True)
    got = normal_balance(gates, torch.tensor(sigma))
    assert got.item() == pytest.approx(_kl(sorted(_normal(sigma, n), reverse=True), v_a), rel=1e-5, abs=1e-6)


def test_normal_balance_gradient_flows_through_the_gates():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    normal_balance(topk_route(logits, 2).gates, torch.tensor(1.0)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- Gram-Schmidt
def _numpy_gram_schmidt(e: np.ndarray) -> np.ndarray:
    """Classical Gram-Schmidt per token, in float64."""
    q = np.zeros_like(e)
    for t in range(e.shape[0]):
        for j in range(e.shape[1]):
            u = e[t, j] - sum(np.dot(e[t, j], q[t, i]) * q[t, i] for i in range(j))
            q[t, j] = u / np.linalg.norm(u)
    return q


@pytest.mark.parametrize("k,d", [(1, 5), (2, 7), (4, 10), (5, 5)])
def test_gram_schmidt_is_orthonormal_and_matches_numpy(k, d):
    e = torch.randn(6, k, d, generator=torch.Generator().manual_seed(k + d))
    q = gram_schmidt(e, 1e-6)
    qqt = q @ q.transpose(1, 2)
    # float32 Gram-Schmidt loses orthogonality by about cond(e) x eps: here cond up to ~290 (a square 5x5
    # draw), so 290 x 1.2e-7 = 3.4e-5; measured 1.2e-5 on one machine's BLAS, 1e-5 was too tight for that
    tol = 5e-5 * max(1.0, float(np.linalg.cond(e.double().numpy()).max()) / 290)
    torch.testing.assert_close(qqt, torch.eye(k).expand(6, k, k), atol=tol, rtol=0)
    np.testing.assert_allclose(q.numpy(), _numpy_gram_schmidt(e.double().numpy()), atol=tol)


def test_gram_schmidt_of_zeros_is_finite_zeros():
    q = gram_schmidt(torch.zeros(3, 4, 6), 1e-6)
    assert torch.isfinite(q).all() and (q == 0).all()
    e = torch.zeros(3, 2, 6, requires_grad=True)
    gram_schmidt(e, 1e-6).sum().backward()
    assert torch.isfinite(e.grad).all()


@pytest.mark.parametrize("magnitude", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_gram_schmidt_weights_reproduce_the_explicit_mixture(magnitude, k):
    eps = 1e-6
    gen = torch.Generator().manual_seed(10 * k + magnitude)
    e = torch.randn(5, k, 9, generator=gen, dtype=torch.float64)
    coef = torch.softmax(torch.randn(5, k, generator=gen, dtype=torch.float64), -1)
    w = gram_schmidt_weights(e @ e.transpose(1, 2), coef, eps, magnitude)
    en, cn = e.numpy(), coef.numpy()
    q = _numpy_gram_schmidt(en)
    expected = np.zeros((5, 9))
    for t in range(5):
        for j in range(k):
            m = math.sqrt(np.dot(en[t, j], en[t, j]) + eps * eps) if magnitude else 1.0
            expected[t] += cn[t, j] * m * q[t, j]
    got = (w.unsqueeze(-1) * e).sum(1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_gram_schmidt_weights_at_zero_gram_are_finite():
    w = gram_schmidt_weights(torch.zeros(4, 3, 3), torch.full((4, 3), 1 / 3), 1e-6, True)
    assert torch.isfinite(w).all()


# ----------------------------------------------------------------------------------- LoRA experts
def _random_experts(n=4, r=3, d_in=7, d_out=5, seed=0) -> LoRAExperts:
    torch.manual_seed(seed)
    ex = LoRAExperts(n, r, d_in, d_out)
    with torch.no_grad():
        ex.lora_B.normal_()
    return ex


def _blocks(ex: LoRAExperts):
    n, r = ex.num_experts, ex.rank
    a = ex.lora_A.detach().double().numpy()
    b = ex.lora_B.detach().double().numpy()
    return [a[i * r:(i + 1) * r] for i in range(n)], [b[:, i * r:(i + 1) * r] for i in range(n)]


def test_fresh_experts_have_zero_B():
    ex = LoRAExperts(3, 2, 6, 4)
    assert (ex.lora_B == 0).all() and ex.lora_A.abs().sum() > 0 and ex.redundancy() == 0.0


@pytest.mark.parametrize("n", [2, 3, 5])
def test_redundancy_is_mean_pairwise_frobenius_distance(n):
    ex = _random_experts(n=n, seed=n)
    a, b = _blocks(ex)
    full = [b[i] @ a[i] for i in range(n)]
    dists = [np.linalg.norm(full[i] - full[j]) for i in range(n) for j in range(i + 1, n)]
    assert ex.redundancy() == pytest.approx(float(np.mean(dists)), rel=1e-5)


def test_redundancy_of_one_expert_or_identical_experts_is_zero():
    assert _random_experts(n=1).redundancy() == 0.0
    ex = _random_experts(n=3)
    with torch.no_grad():
        ex.lora_A.copy_(ex.lora_A[:3].repeat(3, 1))
        ex.lora_B.copy_(ex.lora_B[:, :3].repeat(1, 3))
    assert ex.redundancy() == pytest.approx(0.0, abs=1e-3)


def test_gram_and_outputs_match_explicit_expert_outputs():
    ex = _random_experts(n=4, r=3)
    z = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    _, b = _blocks(ex)
    zn = z.double().numpy()
    e = np.stack([np.stack([b[i] @ zn[t, 3 * i:3 * i + 3] for i in range(4)]) for t in range(6)])  # (T, N, d_out)
    np.testing.assert_allclose(expert_outputs(ex, z).numpy(), e, rtol=1e-5, atol=1e-5)  # the tests' reference
    np.testing.assert_allclose(ex.gram(z).detach().numpy(), e @ e.transpose(0, 2, 1), rtol=1e-5, atol=1e-4)


def test_combine_is_the_gated_sum_of_expert_outputs():
    ex = _random_experts(n=3, r=2)
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    w = torch.rand(4, 3, generator=torch.Generator().manual_seed(6))
    _, b = _blocks(ex)
    zn, wn = z.double().numpy(), w.double().numpy()
    expected = [sum(wn[t, i] * b[i] @ zn[t, 2 * i:2 * i + 2] for i in range(3)) for t in range(4)]
    np.testing.assert_allclose(ex.combine(z, w).detach().numpy(), np.stack(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ex.combine(z, 2.0).detach().numpy(),
                               2.0 * zn @ ex.lora_B.detach().double().numpy().T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- GraphLoRA graph
@pytest.mark.parametrize("n,beta", [(8, 0.1), (8, 0.5), (8, 1.0), (5, 0.3), (2, 1.0), (12, 0.25)])
def test_expert_edges_count_and_distinct_pairs(n, beta):
    edges = expert_edges(n, beta, seed=3)
    complete = n * (n - 1) // 2
    assert len(edges) == round(beta * complete)
    pairs = {tuple(sorted(p)) for p in edges.tolist()}
    assert len(pairs) == len(edges)  # distinct undirected pairs
    assert all(0 <= i < j < n for i, j in pairs)


def test_expert_edges_are_seeded():
    assert torch.equal(expert_edges(8, 0.5, 7), expert_edges(8, 0.5, 7))
    differ = sum(not torch.equal(expert_edges(8, 0.5, 0), expert_edges(8, 0.5, s)) for s in range(1, 6))
    assert differ >= 4


@pytest.mark.parametrize("n,beta,seed", [(4, 0.5, 0), (8, 0.1, 1), (6, 1.0, 2), (3, 0.34, 5)])
def test_normalized_adjacency_by_hand(n, beta, seed):
    edges = expert_edges(n, beta, seed)
    adj = normalized_adjacency(n, edges).double().numpy()
    a = np.eye(n + 1)
    for i in range(1, n + 1):
        a[0, i] = a[i, 0] = 1.0
    for i, j in edges.tolist():
        a[i + 1, j + 1] = a[j + 1, i + 1] = 1.0
    deg = a.sum(1)
    expected = np.array([[a[i, j] / math.sqrt(deg[i] * deg[j]) for j in range(n + 1)] for i in range(n + 1)])
    np.testing.assert_allclose(adj, expected, atol=1e-6)
    np.testing.assert_allclose(adj, adj.T, atol=0)
    assert (adj[0, 1:] > 0).all()  # the token node links to every expert
    expert_links = int((adj[1:, 1:] > 0).sum() - n) // 2
    assert expert_links == len(edges)


# ----------------------------------------------------------------------------------- BERT
def test_bert_with_trained_classifier(tmp_path):
    ids = torch.randint(0, 80, (2, 7), generator=torch.Generator().manual_seed(0))
    model = tiny_bert()
    ref = model(ids).logits
    alloc = AllocationConfig.uniform("mola", 2, experts=3, top_k=2, rank=4,
                                     targets=["query", "key", "value", "dense"])
    adapter = inject(model, alloc, train_modules=("classifier",))
    assert len(adapter.layers) == 8
    assert all(isinstance(l, MoLALinear) for l in adapter.layers.values())
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=0)
    adapter_ids = {id(p) for l in adapter.layers.values() for p in l.adapter_parameters()}
    for name, p in model.named_parameters():
        expected = name.startswith("classifier.") or id(p) in adapter_ids
        assert p.requires_grad == expected, name
    assert {id(p) for p in model.classifier.parameters()} <= {id(p) for p in adapter.trainable_parameters()}
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected_logits = model(ids).logits
    assert not torch.allclose(expected_logits, ref)
    adapter.save(tmp_path / "bert")
    loaded = load_adapter(tiny_bert(), tmp_path / "bert")
    assert loaded.train_modules == ("classifier",)
    torch.testing.assert_close(loaded.model.classifier.weight, model.classifier.weight, atol=0, rtol=0)
    torch.testing.assert_close(loaded.model(ids).logits, expected_logits, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- errors
def test_injection_errors():
    with pytest.raises(AllocationError, match="allocation is for 4 layers.*has 3.*num_layers=3"):
        inject(tiny_llama(), preset("mola", 4))
    with pytest.raises(AllocationError, match=r"target 'mlp\.fc9'.*not a Linear"):
        inject(tiny_llama(), AllocationConfig.uniform("mola", 3, experts=2, targets=["q", "mlp.fc9"]))
    with pytest.raises(AllocationError, match="target 'q'"):
        inject(tiny_bert(), AllocationConfig.uniform("mola", 2, experts=2, targets=["q"]))
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        MoLALinear(nn.Conv1d(2, 2, 1), experts=2, top_k=1, rank=2, alpha=4.0, dropout=0.0,
                   options=preset("mola", 1).options, layer_index=0, num_layers=1, target="q")


def test_injection_error_leaves_model_untouched():
    model = tiny_llama()
    with pytest.raises(AllocationError):
        inject(model, AllocationConfig.uniform("mola", 3, experts=2, targets=["q", "mlp.fc9"]))
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_graphlora_and_omoe_layer_classes_are_registered():
    assert get_method("graphlora").layer_class() is GraphLoRALinear
    assert get_method("omoe").layer_class() is OMoELinear
    layer = MoLALinear(nn.Linear(4, 3), experts=2, top_k=1, rank=4, alpha=6.0, dropout=0.0,
                       options=preset("mola", 1).options, layer_index=0, num_layers=1, target="q")
    assert layer.scaling == 1.5 and (layer.experts.lora_B == 0).all() and layer.router.shape == (2, 4)
