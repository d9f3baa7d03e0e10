"""GraphLoRA against the paper (METHODS.md, GraphLoRA): the Normal load-balance loss compares the sorted
bell with the sorted, training-cumulated activation frequency; sigma starts at N/2."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allocsearch import AllocationConfig
from allocsearch.allocation.methods import get_method
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


# ------------------------------------------------------------------------------ FFN-block form (router_scope)
SMALL = {"gcn_hidden": 16, "node_dim": 8, "edge_density": 0.5}


def block_alloc(method, layers=3, **kw):
    from allocsearch import preset

    if method == "graphlora":
        kw.setdefault("options", SMALL)
    return preset({"graphlora": "graphlora", "mola": "mixlora"}[method], layers, **kw)


def loop_logits(block, x: torch.Tensor) -> torch.Tensor:
    """Router logits token by token: MoLA ``W_r x``; GraphLoRA the 2-layer GCN on [token; experts]."""
    out = []
    for xt in x:
        if not hasattr(block, "expert_emb"):
            out.append(block.router @ xt)
            continue
        adj = block.adjacency
        h0 = torch.cat([torch.relu(block.token_in @ xt)[None], block.expert_emb])  # (N+1, node_dim)
        h1 = torch.relu(adj @ h0 @ block.gcn1 + h0 @ block.gcn1_self)
        out.append((adj @ h1 @ block.readout + h1 @ block.readout_self)[1:, 0])
    return torch.stack(out)


@torch.no_grad()
def loop_block(block, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: the whole MLP with W + s B_i A_i on each adapted projection."""
    n, r, k, s = block.num_experts, block.rank, block.top_k, block.scaling
    logits = loop_logits(block, x)

    def proj(name, i, v):
        out = getattr(block.base, f"{name}_proj").weight @ v
        if name in block.lora:
            a = block.lora[name].lora_A[i * r:(i + 1) * r]
            b = block.lora[name].lora_B[:, i * r:(i + 1) * r]
            out = out + s * (b @ (a @ v))
        return out

    rows = []
    for t, xt in enumerate(x):
        p = torch.softmax(logits[t].double(), -1)
        order = sorted(range(n), key=lambda i: -float(p[i]))[:k]
        total = sum(float(p[i]) for i in order)
        y = torch.zeros(block.out_features, dtype=x.dtype)
        for i in order:
            h = F.silu(proj("gate", i, xt)) * proj("up", i, xt)
            y = y + float(p[i]) / total * proj("down", i, h)
        rows.append(y)
    return torch.stack(rows)


def randomise(adapter, std=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("method", ["graphlora", "mola"])
def test_the_presets_put_one_router_per_decoder_layer_on_the_ffn_block(method):
    from allocsearch.moe import inject
    from allocsearch.moe.ffn_block import FFNBlockMoE, LoRALinear

    alloc = block_alloc(method)
    assert alloc.router_scope == "ffn_block"
    adapter = inject(tiny_llama(), alloc)
    blocks = {p: m for p, m in adapter.layers.items() if isinstance(m, FFNBlockMoE)}
    assert sorted(blocks) == [f"model.layers.{j}.mlp" for j in range(3)]
    assert all(adapter.model.get_submodule(p) is m for p, m in blocks.items())
    others = [m for p, m in adapter.layers.items() if p not in blocks]
    assert len(others) == 3 * 4 and all(isinstance(m, LoRALinear) and m.num_experts == 1 for m in others)
    assert all(b.projections == ("gate", "up", "down") and b.num_experts == 8 and b.top_k == 2
               for b in blocks.values())


@pytest.mark.parametrize("method", ["graphlora", "mola"])
def test_a_fresh_block_adapter_leaves_the_model_unchanged(method, token_ids):
    from allocsearch.moe import inject

    ref = tiny_llama()(token_ids).logits
    adapter = inject(tiny_llama(), block_alloc(method))
    torch.testing.assert_close(adapter.model(token_ids).logits, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method, targets, experts, top_k", [
    ("graphlora", None, 8, 2), ("mola", None, 8, 2), ("graphlora", ["q", "gate", "down"], 5, 3),
    ("mola", ["up", "v"], 4, 4), ("graphlora", ["down"], 3, 1), ("mola", ["gate"], 6, 2)])
def test_the_block_output_equals_a_per_token_per_expert_loop(method, targets, experts, top_k):
    from allocsearch.moe import inject

    kw = {"experts": experts, "top_k": top_k}
    if targets is not None:
        kw.update(targets=targets, moe_targets=[t for t in targets if t in ("gate", "up", "down")])
    model = tiny_llama().double()  # float64 (the router softmax stays fp32)
    adapter = inject(model, block_alloc(method, **kw))
    randomise(adapter)
    x = torch.randn(13, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for j in range(3):
        block = adapter.layers[f"model.layers.{j}.mlp"]
        assert model.config.hidden_act == "silu"
        torch.testing.assert_close(block(x[None])[0], loop_block(block, x), rtol=1e-4, atol=1e-5)
    # and inside the model: the decoder layer calls the block on its post-attention-norm input
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    seen = []
    handle = adapter.layers["model.layers.1.mlp"].register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    model(ids)
    handle.remove()
    torch.testing.assert_close(seen[0][1][0], loop_block(adapter.layers["model.layers.1.mlp"], seen[0][0][0]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["graphlora", "mola"])
def test_the_block_form_in_training_with_dropout_matches_without_and_grads_reach_everything(method, token_ids):
    from allocsearch.moe import inject

    opts = {"load_balance_coef": 0.01} if method == "mola" else SMALL
    adapter = inject(tiny_llama(), block_alloc(method, dropout=0.1, options=opts))
    model = adapter.model.train()
    params = adapter.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(2):  # the first step makes B non-zero so A gets a gradient too
        opt.zero_grad()
        loss = model(token_ids, labels=token_ids).loss
        aux = adapter.aux_loss()
        assert isinstance(aux, torch.Tensor) and aux.requires_grad
        (loss + aux).backward()
        opt.step()
    trainable = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert len(params) == len(list(p for p in model.parameters() if p.requires_grad))


def test_graphlora_block_aux_loss_is_computed_once_per_block_router(token_ids):
    from allocsearch.moe import inject
    from allocsearch.moe.ffn_block import FFNBlockMoE

    adapter = inject(tiny_llama(), block_alloc("graphlora"))
    model = adapter.model.train()
    inputs = {}
    for path, layer in adapter.layers.items():
        if isinstance(layer, FFNBlockMoE):
            layer.register_forward_hook(lambda m, i, o, path=path: inputs.update({path: i[0].reshape(-1, 32)}))
    model(token_ids)
    with_aux = [p for p, layer in adapter.layers.items() if layer.aux_loss is not None]
    assert sorted(with_aux) == sorted(inputs)  # the three block routers, not the attention LoRAs
    expected = 0.0
    for path, x in inputs.items():
        block = adapter.layers[path]
        probs = torch.softmax(loop_logits(block, x.detach()).double(), -1)
        lam, sigma, n = float(block.poisson_lambda.detach()), float(block.normal_sigma.detach()), 8
        assert sigma == pytest.approx(n / 2, rel=1e-5)
        pois = np.array([lam ** i * math.exp(-lam) / math.factorial(i) for i in range(1, n + 1)])
        pois /= pois.sum()
        l_pois = np.mean([np_kl(pois, sorted(p.tolist(), reverse=True)) for p in probs])
        load = np.zeros(n)
        for p in probs.tolist():
            top = sorted(range(n), key=lambda i: -p[i])[:2]
            for i in top:
                load[i] += p[i] / (p[top[0]] + p[top[1]])
        l_norm = np_kl(sorted(np_bell(sigma, n), reverse=True), sorted(load / load.sum(), reverse=True))
        expected += 0.005 * l_pois + 8.0 * l_norm
        np.testing.assert_allclose(block.activation_total.double().numpy(), load, rtol=1e-4)
    assert adapter.aux_loss().item() == pytest.approx(expected, rel=1e-4)


def test_mixlora_block_switch_loss_is_one_per_block_router(token_ids):
    from allocsearch.moe import inject

    coef, n, k = 0.01, 8, 2
    adapter = inject(tiny_llama(), block_alloc("mola", options={"load_balance_coef": coef}))
    model = adapter.model.train()
    inputs = []
    for j in range(3):
        adapter.layers[f"model.layers.{j}.mlp"].register_forward_hook(
            lambda m, i, o: inputs.append((m, i[0].reshape(-1, 32))))
    model(token_ids)
    expected = 0.0
    for block, x in inputs:
        probs = torch.softmax((x.detach() @ block.router.detach().t()).double(), -1).numpy()
        counts = np.zeros(n)
        for p in probs:
            counts[np.argsort(-p)[:k]] += 1
        expected += coef * n * float(np.dot(counts / counts.sum(), probs.mean(0)))
    assert adapter.aux_loss().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", ["graphlora", "mola"])
def test_block_expert_load_and_trainable_parameters_by_visiting_layers(method, token_ids):
    from allocsearch.moe import inject

    adapter = inject(tiny_llama(), block_alloc(method))
    adapter.track_load(True)
    adapter.model(token_ids)
    loads = adapter.expert_load()
    for j in range(3):
        block = adapter.layers[f"model.layers.{j}.mlp"]
        assert sum(loads[f"model.layers.{j}.mlp"]) == pytest.approx(1.0)
        assert float(block.load_counts.sum()) == token_ids.numel() * 2
    assert all(v == [0.0] for p, v in loads.items() if not p.endswith(".mlp"))
    expected = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
    assert adapter.num_trainable() == expected > 0
    assert all(np.isfinite(v) for v in adapter.redundancy().values())


@pytest.mark.parametrize("method", ["graphlora", "mola"])
def test_block_save_load_round_trip(method, token_ids, tmp_path):
    from allocsearch.moe import inject, load_adapter

    adapter = inject(tiny_llama(), block_alloc(method))
    adapter.model.train()
    adapter.model(token_ids)  # GraphLoRA: a non-zero running total
    adapter.aux_loss()
    adapter.model.eval()
    randomise(adapter, std=0.05)
    expected = adapter.model(token_ids).logits
    adapter.save(tmp_path / "a")
    loaded = load_adapter(tiny_llama(), tmp_path / "a")
    assert loaded.allocation.router_scope == "ffn_block"
    torch.testing.assert_close(loaded.model(token_ids).logits, expected, rtol=0, atol=1e-6)
    state, back = adapter._state(), loaded._state()
    assert set(state) == set(back) and all(torch.equal(state[key], back[key]) for key in state)


def test_bf16_block_forward_backward_is_finite(token_ids):
    from allocsearch.moe import inject

    model = tiny_llama().to(torch.bfloat16)
    adapter = inject(model, block_alloc("graphlora"))
    model.train()
    loss = model(token_ids, labels=token_ids).loss + adapter.aux_loss()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.grad.float()).all()
               for p in adapter.trainable_parameters())


def test_router_scope_field_is_documented_defaulted_and_checked():
    from allocsearch.allocation.config import AllocationError
    from conftest import one_line

    old = AllocationConfig.uniform("graphlora", 2, experts=4).to_dict()
    assert old["router_scope"] == "linear"
    del old["router_scope"]  # configs written before the field load as before
    assert AllocationConfig.from_dict(old).router_scope == "linear"
    assert AllocationConfig.from_dict({**old, "router_scope": "ffn_block"}).router_scope == "ffn_block"
    with pytest.raises(AllocationError) as exc:
        AllocationConfig.from_dict({**old, "router_scope": "block"})
    assert "linear, ffn_block" in one_line(exc)
    with pytest.raises(AllocationError) as exc:
        AllocationConfig.uniform("omoe", 2, experts=2, router_scope="ffn_block")
    assert "graphlora" in one_line(exc) and "mola" in one_line(exc)
    with pytest.raises(AllocationError) as exc:
        AllocationConfig.uniform("graphlora", 2, experts=4, router_scope="ffn_block",
                                 targets=["query", "intermediate", "output"])
    assert "router_scope linear" in one_line(exc)
    with pytest.raises(AllocationError) as exc:
        AllocationConfig.uniform("mola", 2, experts=4, router_scope="ffn_block", moe_targets=["q", "gate"])
    assert "moe_targets" in one_line(exc)
    import allocsearch.allocation.config as allocation_module

    assert "router_scope" in allocation_module.__doc__


def test_ffn_block_on_a_bert_encoder_is_a_clear_one_line_error():
    from allocsearch.allocation.config import AllocationError
    from allocsearch.moe import inject
    from conftest import one_line, tiny_bert

    with pytest.raises(AllocationError) as exc:
        inject(tiny_bert(), AllocationConfig.uniform("graphlora", 2, experts=4, router_scope="ffn_block",
                                                      targets=["gate", "up", "down"]))
    msg = one_line(exc)
    assert "gated Llama-style MLP" in msg and "router_scope linear" in msg


def test_the_per_linear_form_stays_available():
    from allocsearch.moe import inject
    from allocsearch.moe.graphlora import GraphLoRALinear

    adapter = inject(tiny_llama(), block_alloc("graphlora", router_scope="linear"))
    assert all(isinstance(m, GraphLoRALinear) for m in adapter.layers.values()) and len(adapter.layers) == 21
