"""The MoE-LoRA layers (OMoE, LoRACoE, MoLA, GraphLoRA) against hand computations, and the Adapter API
(aux loss, expert load, parameter counts)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from allocsearch import AllocationConfig, preset
from allocsearch.allocation.methods import get_method
from allocsearch.moe import inject
from allocsearch.moe.loracoe import LoRACoELinear
from allocsearch.moe.omoe import OMoELinear
from conftest import tiny_llama
import graphlora_reference
from omoe_reference import omoe_delta


def make_layer(method, *, d_in=12, d_out=10, experts=4, top_k=2, rank=3, alpha=6.0, options=None,
               layer_index=0, num_layers=1, seed=0):
    """One wrapped Linear, built as ``allocsearch.bench.layers._ours`` does; dropout 0."""
    torch.manual_seed(seed)
    alloc = AllocationConfig.uniform(method, num_layers, experts=experts, top_k=top_k, rank=rank,
                                     dropout=0.0, targets=["q"], options=options)
    return get_method(method).layer_class()(
        nn.Linear(d_in, d_out), experts=experts, top_k=top_k, rank=rank, alpha=alpha, dropout=0.0,
        options=alloc.options, layer_index=layer_index, num_layers=num_layers, target="q")


def perturb_b(layer, std=0.5):
    with torch.no_grad():
        layer.experts.lora_B.normal_(std=std)


def _x(t=7, d=12, seed=1):
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed))


def _np(t):
    return t.detach().double().numpy()


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


# ----------------------------------------------------------------------------------- OMoE
@pytest.mark.parametrize("mode", ["magnitude", "unit"])
@pytest.mark.parametrize("experts,top_k", [(2, 2), (4, 2), (4, 4), (3, 1)])
def test_omoe_delta_equals_reference(mode, experts, top_k):
    layer = make_layer("omoe", experts=experts, top_k=top_k,
                       options={"placement": "all", "orthogonalization": mode})
    assert layer.orthogonal
    perturb_b(layer)
    x = _x()
    torch.testing.assert_close(layer.delta(x), omoe_delta(layer, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["magnitude", "unit"])
def test_omoe_first_backward_is_finite(mode):
    layer = make_layer("omoe", experts=3, top_k=3, options={"placement": "all", "orthogonalization": mode})
    if mode == "magnitude":
        assert (layer.experts.lora_B == 0).all()
    else:
        assert (layer.experts.lora_B != 0).any()
    x = _x().requires_grad_(True)
    out = layer(x)
    (out * torch.randn_like(out)).sum().backward()
    params = layer.adapter_parameters()
    assert len(params) == 3  # A, B, router
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert torch.isfinite(x.grad).all()
    assert layer.experts.lora_B.grad.abs().sum() > 0


def test_omoe_magnitude_at_init_leaves_output_unchanged():
    layer = make_layer("omoe", experts=3, top_k=2, options={"placement": "all"})
    x = _x()
    torch.testing.assert_close(layer(x), layer.base(x), atol=0, rtol=0)


@pytest.mark.parametrize("placement,expected", [("low", {0, 1, 2}), ("middle", {3, 4, 5}), ("high", {6, 7, 8}),
                                                ("all", set(range(9))), ([1, 7], {1, 7}), ([], set())])
def test_omoe_placement(placement, expected):
    adapter = inject(tiny_llama(layers=9), preset("omoe", 9, targets=["q", "down"],
                                                  options={"placement": placement, "orthogonalization": "unit"}))
    assert len(adapter.layers) == 18
    for layer in adapter.layers.values():
        assert isinstance(layer, OMoELinear)
        assert layer.orthogonal == (layer.layer_index in expected), layer.layer_index
        # vanilla layers are plain MoE: zero B; "unit" orthogonal layers start from a small non-zero B
        assert bool((layer.experts.lora_B != 0).any()) == layer.orthogonal


def test_omoe_vanilla_layer_is_plain_mola_mixture():
    layer = make_layer("omoe", experts=3, top_k=2, options={"placement": [1]}, num_layers=2)
    assert not layer.orthogonal
    perturb_b(layer)
    x = _x()
    logits = _np(x) @ _np(layer.router).T
    a, b = _np(layer.experts.lora_A), _np(layer.experts.lora_B)
    expected = []
    for t in range(x.shape[0]):
        p = _softmax(logits[t])
        top = np.argsort(-p)[:2]
        expected.append(sum(p[i] / p[top].sum() * layer.scaling * b[:, 3 * i:3 * i + 3] @ a[3 * i:3 * i + 3]
                            @ _np(x)[t] for i in top))
    np.testing.assert_allclose(_np(layer.delta(x)), np.stack(expected), atol=1e-5)


# ----------------------------------------------------------------------------------- LoRACoE
def _coe(scale="rank", experts=3, rank=4, alpha=8.0):
    layer = make_layer("loracoe", experts=experts, top_k=experts, rank=rank, alpha=alpha,
                       options={"composition_scale": scale})
    perturb_b(layer)
    with torch.no_grad():
        layer.route.normal_(std=1.0)
    return layer


def test_loracoe_fused_equals_unfused():
    layer = _coe()
    x = _x()
    torch.testing.assert_close(layer.delta(x), layer.delta_unfused(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", ["rank", "paper"])
def test_loracoe_joint_output_by_hand(scale):
    layer, e, r = _coe(scale), 3, 4
    x = _x()
    a, b, route = _np(layer.experts.lora_A), _np(layer.experts.lora_B), _np(layer.route)
    expected = []
    for xt in _np(x):
        g = np.mean([_softmax(route[i * r:(i + 1) * r] @ xt) for i in range(e)], axis=0)
        g = g * r if scale == "rank" else g
        expected.append(layer.scaling * b @ (g * (a @ xt)))
    np.testing.assert_allclose(_np(layer(x) - layer.base(x)), np.stack(expected), atol=1e-5)


def test_loracoe_phases():
    layer = _coe()
    x = _x()
    layer.set_phase("warmup")
    assert layer.route.requires_grad is False
    a, b = _np(layer.experts.lora_A), _np(layer.experts.lora_B)
    plain = _np(layer.base(x)) + layer.scaling * _np(x) @ a.T @ b.T  # s * B A x
    warm = layer(x)
    np.testing.assert_allclose(_np(warm), plain, atol=1e-5)
    warm.sum().backward()
    assert layer.route.grad is None
    layer.set_phase("joint")
    assert layer.route.requires_grad is True
    assert not torch.allclose(layer(x), warm)  # the random router now changes the output
    with pytest.raises(ValueError, match="warmup"):
        layer.set_phase("finetune")


@pytest.mark.parametrize("scale,factor", [("rank", 1.0), ("paper", 0.25)])
def test_loracoe_zero_router_reproduces_the_warmed_up_lora(scale, factor):
    layer = _coe(scale, rank=4)
    x = _x()
    layer.set_phase("warmup")
    warm = layer.delta(x)
    layer.set_phase("joint")
    with torch.no_grad():
        layer.route.zero_()
    torch.testing.assert_close(layer.delta(x), factor * warm, atol=1e-6, rtol=1e-5)


def test_loracoe_parameter_count_is_the_paper_formula():
    adapter = inject(tiny_llama(), preset("loracoe", 3, rank=4, experts=3, top_k=3))
    expected_total = 0
    for layer in adapter.layers.values():
        assert isinstance(layer, LoRACoELinear)
        r, e, d_in, d_out = layer.rank, layer.num_experts, layer.in_features, layer.out_features
        assert sum(p.numel() for p in layer.adapter_parameters()) == r * (d_in + d_out + d_in * e)
        expected_total += r * (d_in + d_out + d_in * e)
    assert adapter.num_trainable() == expected_total
    adapter.set_phase("warmup")
    assert adapter.num_trainable() == sum(l.rank * (l.in_features + l.out_features) for l in adapter.layers.values())


# ----------------------------------------------------------------------------------- MoLA
def test_mola_parameter_count_per_module():
    alloc = AllocationConfig(method="mola", num_layers=3, experts=[2, 4, 3], top_k=[1, 2, 3], rank=[2, 4, 8],
                             moe_targets=["q", "v", "gate", "up", "down"])
    adapter = inject(tiny_llama(), alloc)
    total = 0
    for layer in adapter.layers.values():
        j, d_in, d_out = layer.layer_index, layer.in_features, layer.out_features
        n, r = (alloc.experts[j], alloc.rank[j]) if layer.target in alloc.moe_targets else (1, alloc.rank[j])
        expected = n * r * (d_in + d_out) + (n * d_in if n > 1 else 0)
        assert sum(p.numel() for p in layer.adapter_parameters()) == expected, layer
        assert (layer.router is None) == (n == 1)
        total += expected
    assert adapter.num_trainable() == total


@pytest.mark.parametrize("experts,top_k", [(5, 2), (5, 1), (4, 4), (1, 1)])
def test_mola_output_equals_a_per_token_loop(experts, top_k):
    layer = make_layer("mola", experts=experts, top_k=top_k, rank=3, alpha=6.0)
    perturb_b(layer)
    x = _x()
    xs, a, b = _np(x), _np(layer.experts.lora_A), _np(layer.experts.lora_B)
    w0, b0 = _np(layer.base.weight), _np(layer.base.bias)
    s, r = 2.0, 3
    expected = []
    for xt in xs:
        if experts == 1:
            p, top = np.ones(1), [0]
        else:
            p = _softmax(_np(layer.router) @ xt)
            top = np.argsort(-p)[:top_k]
        h = w0 @ xt + b0
        for i in top:
            h = h + p[i] / p[top].sum() * s * b[:, i * r:(i + 1) * r] @ (a[i * r:(i + 1) * r] @ xt)
        expected.append(h)
    np.testing.assert_allclose(_np(layer(x)), np.stack(expected), atol=1e-5)


def test_mola_keeps_input_shape_and_dtype():
    layer = make_layer("mola", experts=3, top_k=2)
    x = torch.randn(2, 5, 12)
    out = layer(x)
    assert out.shape == (2, 5, 10) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------- GraphLoRA
GL_OPTS = {"edge_density": 0.5, "gcn_hidden": 16, "node_dim": 8}


def test_graphlora_router_logits_equal_reference():
    layer = make_layer("graphlora", experts=6, top_k=2, options=GL_OPTS)
    tok = torch.randn(9, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer.router_logits(tok), graphlora_reference.router_logits(layer, tok), atol=1e-5, rtol=1e-4)


def test_graphlora_delta_by_hand_from_reference_logits():
    layer = make_layer("graphlora", experts=6, top_k=2, rank=3, alpha=6.0, options={**GL_OPTS, "edge_density": 0.1})
    perturb_b(layer)
    x = _x()
    logits = _np(graphlora_reference.router_logits(layer, x @ layer.token_in.t()))
    gaps = np.diff(-np.sort(-logits, axis=1), axis=1)[:, 1]  # k-th minus (k+1)-th: top-2 unambiguous
    assert (np.abs(gaps) > 1e-5).all()
    a, b = _np(layer.experts.lora_A), _np(layer.experts.lora_B)
    expected = []
    for t, xt in enumerate(_np(x)):
        p = _softmax(logits[t])
        top = np.argsort(-p)[:2]
        expected.append(sum(p[i] / p[top].sum() * 2.0 * b[:, 3 * i:3 * i + 3] @ a[3 * i:3 * i + 3] @ xt
                            for i in top))
    np.testing.assert_allclose(_np(layer.delta(x)), np.stack(expected), atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_graphlora_layer_edge_density(beta):
    for j in range(3):
        layer = make_layer("graphlora", experts=8, top_k=2, layer_index=j, num_layers=3,
                           options={**GL_OPTS, "edge_density": beta})
        complete = 8 * 7 / 2
        assert abs(len(layer.edges) / complete - beta) <= 0.5 / complete
        adj = layer.adjacency
        assert torch.equal(adj, adj.t())
        assert int((adj[1:, 1:] > 0).sum() - 8) // 2 == len(layer.edges)


@pytest.mark.parametrize("beta,layer_index", [(1.0, 0), (0.1, 0), (0.1, 1), (0.5, 0)])
def test_graphlora_router_can_tell_experts_apart(beta, layer_index):
    """Every pair of experts must get different logits for some token. Experts whose nodes have the same
    closed neighbourhood ("twins": all of them on a complete graph; the two ends of an isolated edge, e.g.
    experts 1-2 in layer 1 with the paper default N=8, beta=0.1, seed 0) get identical rows of the
    normalised adjacency, so a GCN over it gives them identical logits whatever their embeddings."""
    layer = make_layer("graphlora", experts=8, top_k=2, layer_index=layer_index, num_layers=2,
                       options={**GL_OPTS, "edge_density": beta})
    logits = layer.router_logits(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    twins = [(i, j) for i in range(8) for j in range(i + 1, 8)
             if torch.allclose(logits[:, i], logits[:, j], atol=1e-7, rtol=0)]
    assert not twins, f"beta={beta}, layer {layer_index} (edges {layer.edges.tolist()}): experts {twins} " \
                      f"always get the same logit"


def test_graphlora_graph_is_fixed_by_seed_and_saved():
    a = make_layer("graphlora", experts=8, options={**GL_OPTS, "graph_seed": 5}, seed=0)
    b = make_layer("graphlora", experts=8, options={**GL_OPTS, "graph_seed": 5}, seed=1)
    assert torch.equal(a.edges, b.edges)
    assert "edges" in a.adapter_state_dict() and "adjacency" in a.adapter_state_dict()


def test_graphlora_lambda_sigma_stay_positive():
    layer = make_layer("graphlora", experts=4, options={**GL_OPTS, "lambda_init": 1.5, "sigma_init": 0.7})
    assert layer.poisson_lambda.item() == pytest.approx(1.5, rel=1e-5)
    assert layer.normal_sigma.item() == pytest.approx(0.7, rel=1e-5)
    opt = torch.optim.SGD([layer.lambda_raw, layer.sigma_raw], lr=20.0)
    for _ in range(3):
        opt.zero_grad()
        (layer.poisson_lambda + layer.normal_sigma).backward()  # pushes both down
        opt.step()
    assert layer.lambda_raw.item() < 0 and layer.sigma_raw.item() < 0
    assert layer.poisson_lambda.item() > 0 and layer.normal_sigma.item() > 0
    layer.train()
    layer(_x())
    assert torch.isfinite(layer.aux_loss) and layer.aux_loss.item() > 0


# ----------------------------------------------------------------------------------- Adapter API
def _graphlora(layers=3):
    return preset("graphlora", layers, options=GL_OPTS)


def test_aux_loss_positive_after_training_forward_and_cleared(token_ids):
    for alloc in (_graphlora(), AllocationConfig.uniform("mola", 3, experts=4, top_k=2,
                                                         options={"load_balance_coef": 0.01})):
        adapter = inject(tiny_llama(), alloc)
        adapter.model.train()
        adapter.model(token_ids)
        aux = adapter.aux_loss()
        assert isinstance(aux, torch.Tensor) and aux.item() > 0 and aux.requires_grad, alloc.method
        assert adapter.aux_loss() == 0.0  # cleared after reading
        adapter.model.eval()
        adapter.model(token_ids)
        assert adapter.aux_loss() == 0.0  # eval forwards record none


def test_mola_aux_loss_is_the_switch_loss_summed_over_layers(token_ids):
    coef = 0.01
    adapter = inject(tiny_llama(), AllocationConfig.uniform("mola", 3, experts=3, top_k=2, targets=["q"],
                                                            options={"load_balance_coef": coef}))
    adapter.model.train()
    captured = []
    for layer in adapter.layers.values():
        layer.register_forward_hook(lambda m, inp, out: captured.append(inp[0].reshape(-1, m.in_features)))
    adapter.model(token_ids)
    expected = 0.0
    for layer, x in zip(adapter.layers.values(), captured):
        probs = [_softmax(v) for v in _np(x) @ _np(layer.router).T]
        counts = np.zeros(3)
        for p in probs:
            counts[np.argsort(-p)[:2]] += 1
        f = counts / counts.sum()
        expected += coef * 3 * float(np.dot(f, np.mean(probs, axis=0)))
    assert adapter.aux_loss().item() == pytest.approx(expected, rel=1e-5)


def test_mola_aux_loss_is_zero_without_coefficient(token_ids):
    adapter = inject(tiny_llama(), AllocationConfig.uniform("mola", 3, experts=4, top_k=2))
    adapter.model.train()
    adapter.model(token_ids)
    assert adapter.aux_loss() == 0.0


@pytest.mark.parametrize("alloc", [lambda: preset("mixlora", 3), _graphlora,
                                   lambda: preset("omoe", 3, experts=3, top_k=2)], ids=["mixlora", "graphlora", "omoe"])
def test_expert_load_fractions(alloc, token_ids):
    alloc = alloc()
    adapter = inject(tiny_llama(), alloc)
    adapter.track_load(True)
    adapter.model(token_ids)
    tokens = token_ids.numel()
    loads = adapter.expert_load()
    assert set(loads) == set(adapter.layers)
    for path, load in loads.items():
        layer = adapter.layers[path]
        assert len(load) == layer.num_experts
        if layer.num_experts > 1:
            assert sum(load) == pytest.approx(1.0)
            assert float(layer.load_counts.sum()) == tokens * layer.top_k
        else:
            assert load == [0.0]
    adapter.track_load(False)
    adapter.model(token_ids)
    assert all(sum(v) == 0.0 for v in adapter.expert_load().values())


def test_loracoe_load_is_composition_mass_per_rank(token_ids):
    adapter = inject(tiny_llama(), preset("loracoe", 3, rank=4, targets=["q", "up"]))
    adapter.track_load(True)
    adapter.model(token_ids)
    for load in adapter.expert_load().values():
        assert len(load) == 4 and sum(load) == pytest.approx(1.0) and min(load) > 0


@pytest.mark.parametrize("alloc", [lambda: preset("mola", 3), _graphlora, lambda: preset("loracoe", 3),
                                   lambda: preset("lora", 3)], ids=["mola", "graphlora", "loracoe", "lora"])
def test_num_trainable_is_the_trainable_numel(alloc):
    adapter = inject(tiny_llama(), alloc())
    expected = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
    assert adapter.num_trainable() == expected > 0
    assert adapter.num_total() > expected
