"""GraphLoRA against the paper (METHODS.md, GraphLoRA): the Normal load-balance loss compares the sorted
bell with the sorted, training-cumulated activation frequency; sigma starts at N/2."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from allocsearch import AllocationConfig
from allocsearch.methods import get_method
from allocsearch.moe.losses import _kl, normal_balance, normal_target
from allocsearch.moe.routers import topk_route
from conftest import tiny_llama

GL = {"gcn_hidden": 16, "node_dim": 8}


def make_layer(*, d_in=12, d_out=10, experts=6, top_k=2, rank=3, options=None, seed=0):
    torch.manual_seed(seed)
    alloc = AllocationConfig.uniform("graphlora", 1, experts=experts, top_k=top_k, rank=rank, targets=["q"],
                                     options={**GL, **(options or {})})
    return get_method("graphlora").layer_class()(
        nn.Linear(d_in, d_out), experts=experts, top_k=top_k, rank=rank, alpha=2.0 * rank, dropout=0.0,
        options=alloc.options, layer_index=0, num_layers=1, target="q")


def np_bell(sigma: float, n: int) -> np.ndarray:
    v = np.array([math.exp(-(i - n / 2) ** 2 / (2 * sigma ** 2)) for i in range(1, n + 1)])
    return v / v.sum()


def np_kl(p, q) -> float:
    return float(sum(pi * (math.log(pi) - math.log(max(qi, 1e-12))) for pi, qi in zip(p, q)))


def sorted_profile(gates: torch.Tensor) -> torch.Tensor:
    load = gates.detach().sum(0)
    return (load / load.sum()).sort(descending=True).values


# ------------------------------------------------------------------------------------------ Normal loss
@pytest.mark.parametrize("sigma, n", [(1.0, 8), (1.5, 6), (4.0, 8)])
def test_a_bell_shaped_load_scores_lower_than_a_uniform_one(sigma, n):
    s = torch.tensor(sigma)
    bell = torch.tensor(np_bell(sigma, n), dtype=torch.float32)
    shuffled = bell[torch.randperm(n, generator=torch.Generator().manual_seed(n))]  # any expert order
    uniform = torch.full((n,), 1.0 / n)
    l_bell, l_uniform = normal_balance(shuffled[None], s), normal_balance(uniform[None], s)
    assert l_bell.item() == pytest.approx(0.0, abs=1e-6)
    assert l_bell.item() < l_uniform.item()
    # by hand: KL(sort(bell) || sort(load))
    assert l_uniform.item() == pytest.approx(np_kl(sorted(np_bell(sigma, n), reverse=True), [1 / n] * n), rel=1e-5)


def test_the_gradient_at_uniform_load_moves_the_sorted_profile_towards_the_bell():
    n, k, t = 8, 2, 512
    sigma = torch.tensor(1.5)
    target = normal_target(sigma, n).sort(descending=True).values
    logits = (torch.randn(t, n, generator=torch.Generator().manual_seed(0)) * 0.5).requires_grad_()
    before = _kl(target, sorted_profile(topk_route(logits, k).gates)).item()
    assert before > 0.1  # a near-uniform load, far from the bell
    normal_balance(topk_route(logits, k).gates, sigma).backward()
    with torch.no_grad():
        stepped = logits - 50.0 * logits.grad
    after = _kl(target, sorted_profile(topk_route(stepped, k).gates)).item()
    assert after < before - 0.01, (before, after)


def test_the_running_activation_total_is_v_a_history_and_accumulates():
    n, k = 6, 2
    layer = make_layer(experts=n, top_k=k, options={"normal_coef": 1.0, "poisson_coef": 0.0}).train()
    assert torch.equal(layer.activation_total, torch.zeros(n))
    assert "activation_total" in layer.adapter_state_dict()  # persistent: saved with the adapter
    xs = [torch.randn(9, 12, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    total = np.zeros(n)
    sigma = float(layer.normal_sigma.detach())
    for x in xs:
        with torch.no_grad():
            gates = topk_route(layer.router_logits(x @ layer.token_in.t()), k).gates.double().numpy()
        layer(x)
        load = total + gates.sum(0)
        expected = np_kl(sorted(np_bell(sigma, n), reverse=True), sorted(load / load.sum(), reverse=True))
        assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        total = load
        np.testing.assert_allclose(layer.activation_total.double().numpy(), total, rtol=1e-5)
    layer.eval()
    layer(xs[0])
    np.testing.assert_allclose(layer.activation_total.double().numpy(), total, rtol=1e-5)  # eval: unchanged


def test_the_normal_loss_gradient_reaches_only_the_current_batch():
    layer = make_layer(options={"normal_coef": 1.0, "poisson_coef": 0.0}).train()
    layer(torch.randn(9, 12))
    layer.aux_loss.backward()
    assert layer.activation_total.grad is None and not layer.activation_total.requires_grad
    assert layer.token_in.grad is not None and layer.token_in.grad.abs().sum() > 0
    assert layer.sigma_raw.grad is not None


@pytest.mark.parametrize("n", [2, 5, 8])
def test_sigma_starts_at_half_the_experts(n):
    layer = make_layer(experts=n, top_k=min(2, n))
    assert float(layer.normal_sigma.detach()) == pytest.approx(n / 2, rel=1e-5)
    assert float(make_layer(experts=n, top_k=1, options={"sigma_init": 0.7}).normal_sigma.detach()) == pytest.approx(0.7, rel=1e-5)


def test_the_running_total_survives_save_and_load(tmp_path):
    from allocsearch.moe import inject, load_adapter

    alloc = AllocationConfig.uniform("graphlora", 3, experts=4, top_k=2, rank=2, targets=["q", "gate"],
                                     options=GL)
    model = tiny_llama()
    adapter = inject(model, alloc)
    model.train()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(ids)
        adapter.aux_loss()
    totals = {p: layer.activation_total.clone() for p, layer in adapter.layers.items()}
    assert all(t.sum() > 0 for t in totals.values())
    # two forwards of 14 tokens, top-K weights summing to 1 per token
    assert all(float(t.sum()) == pytest.approx(28.0, rel=1e-5) for t in totals.values())
    adapter.save(tmp_path / "a")
    loaded = load_adapter(tiny_llama(), tmp_path / "a")
    for p, layer in loaded.layers.items():
        torch.testing.assert_close(layer.activation_total, totals[p])
