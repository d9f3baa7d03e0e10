"""One parametrised matrix over every registered method (and the baseline presets built from them)."""
from __future__ import annotations

import pytest
import torch

from allocsearch import AllocationConfig, preset
from allocsearch.allocation.methods import METHOD_NAMES
from allocsearch.moe import MoELoRALayer, inject, load_adapter
from conftest import tiny_llama

L = 3
# name -> allocation for a 3-layer tiny Llama; per-layer lists differ on purpose
CASES = {
    "lora": lambda: AllocationConfig(method="lora", num_layers=L, experts=[1] * L, top_k=[1] * L, rank=[2, 4, 8]),
    "dora": lambda: preset("dora", L),
    "mola": lambda: AllocationConfig(method="mola", num_layers=L, experts=[2, 4, 3], top_k=[1, 2, 3],
                                     rank=[2, 4, 8], options={"load_balance_coef": 0.01}),
    "mixlora": lambda: preset("mixlora", L),
    "mixlora-recompute": lambda: preset("mixlora", L, options={"recompute_experts": True}),
    "loramoe": lambda: preset("loramoe", L),
    "loracoe": lambda: preset("loracoe", L),
    "graphlora": lambda: preset("graphlora", L, options={"edge_density": 0.5, "gcn_hidden": 16, "node_dim": 8}),
    "omoe": lambda: preset("omoe", L, experts=3, top_k=3, options={"placement": "middle"}),
    "omoe-unit": lambda: preset("omoe", L, options={"placement": "all", "orthogonalization": "unit"}),
}
CHANGES_OUTPUT_AT_INIT = {"omoe-unit"}  # the paper's orthonormal form needs a non-zero B at init


def test_every_registered_method_is_in_the_matrix():
    covered = {CASES[name]().method for name in CASES}
    assert covered == set(METHOD_NAMES)


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_leaves_outputs_unchanged(name, token_ids):
    ref = tiny_llama()(token_ids).logits
    adapter = inject(tiny_llama(), CASES[name]())
    out = adapter.model(token_ids).logits
    if name in CHANGES_OUTPUT_AT_INIT:
        assert not torch.allclose(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_every_trainable_parameter_and_nothing_else(name, token_ids):
    adapter = inject(tiny_llama(), CASES[name]())
    model = adapter.model.train()
    params = adapter.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.05)
    # one step first so zero-initialised B no longer blocks the gradient of A
    for _ in range(2):
        opt.zero_grad()
        loss = model(token_ids, labels=token_ids).loss + adapter.aux_loss()
        loss.backward()
        opt.step()
    trainable = {id(p) for p in params}
    for n, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"no gradient reached {n}"
        else:
            assert p.grad is None and not p.requires_grad, f"frozen parameter {n} got a gradient"


def _saved_and_loaded(adapter, token_ids, tmp_path):
    """(the adapter's logits after a random nudge of every trainable weight, the adapter saved and loaded
    into a fresh model)."""
    with torch.no_grad():  # make the adapter non-trivial
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    expected = adapter.model(token_ids).logits
    adapter.save(tmp_path / "adapter")
    return expected, load_adapter(tiny_llama(), tmp_path / "adapter")


@pytest.mark.parametrize("name", CASES)
def test_save_load_round_trip(name, token_ids, tmp_path):
    adapter = inject(tiny_llama(), CASES[name]())
    expected, loaded = _saved_and_loaded(adapter, token_ids, tmp_path)
    torch.testing.assert_close(loaded.model(token_ids).logits, expected, rtol=0, atol=1e-6)
    assert loaded.allocation.to_dict() == adapter.allocation.to_dict()


@pytest.mark.parametrize("name", CASES)
def test_trains_tiny_llama_with_falling_loss(name):
    torch.manual_seed(0)
    adapter = inject(tiny_llama(), CASES[name]())
    model = adapter.model.train()
    batch = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(batch, labels=batch).loss
        (loss + adapter.aux_loss()).backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), losses  # no NaN
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("lora", "dora")])
def test_injection_wraps_exactly_the_allocated_modules(name):
    alloc = CASES[name]()
    adapter = inject(tiny_llama(), alloc)
    layers = [m for m in adapter.model.modules() if isinstance(m, MoELoRALayer)]
    if alloc.router_scope == "ffn_block":  # gate/up/down are one block layer with one router per decoder layer
        blocks = [m for m in adapter.model.modules() if type(m).__name__.endswith("FFNBlock")]
        assert len(blocks) == L and all(b.num_experts == alloc.experts[b.layer_index] for b in blocks)
        assert len(layers) == L * (len(alloc.targets) - 3) and len(adapter.layers) == len(layers) + L
    else:
        assert len(layers) == len(adapter.layers) == L * len(alloc.targets)
    for layer in layers:
        j = layer.layer_index
        moe = alloc.is_moe_target(layer.target) and alloc.router_scope == "linear"
        assert layer.num_experts == (alloc.experts[j] if moe else 1)
        assert layer.top_k == (alloc.top_k[j] if moe else 1)
        assert layer.rank == alloc.rank[j]


@pytest.mark.parametrize("name", ["mola", "loracoe", "graphlora", "omoe"])
def test_bf16_forward_backward_is_finite(name, token_ids):
    model = tiny_llama().to(torch.bfloat16)
    adapter = inject(model, CASES[name]())
    model.train()
    loss = model(token_ids, labels=token_ids).loss + adapter.aux_loss()
    loss.backward()
    assert torch.isfinite(loss)
    for p in adapter.trainable_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p.grad.float()).all()


def _frozen_middle(name: str) -> AllocationConfig:
    """The case's allocation with layer 1 holding no adapter (rank 0)."""
    alloc = CASES[name]()
    rank = list(alloc.rank)
    rank[1] = 0
    return alloc.replace(rank=rank)


@pytest.mark.parametrize("name", CASES)
def test_a_frozen_layer_holds_no_adapter_and_the_others_train(name, token_ids):
    alloc = _frozen_middle(name)
    assert (alloc.experts[1], alloc.top_k[1], alloc.rank[1]) == (0, 0, 0) and alloc.adapted_layers == [0, 2]
    model = tiny_llama()
    frozen_block = {n: p.detach().clone() for n, p in model.model.layers[1].named_parameters()}
    adapter = inject(model, alloc)
    trained = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    in_layer = lambda j: {n for n in trained if f"layers.{j}." in n}  # noqa: E731
    assert not in_layer(1), sorted(in_layer(1))[:3]
    assert in_layer(0) and in_layer(2)
    if adapter.layers:  # our layers: none sits in layer 1
        assert {layer.layer_index for layer in adapter.layers.values()} == {0, 2}
    model = adapter.model.train()
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        (model(token_ids, labels=token_ids).loss + adapter.aux_loss()).backward()
        opt.step()
    block = dict((n.split("layers.1.", 1)[1], p) for n, p in adapter.model.named_parameters() if "layers.1." in n)
    assert block.keys() == frozen_block.keys()  # nothing wrapped: the block's own parameter names
    for n, p in block.items():
        torch.testing.assert_close(p, frozen_block[n], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mola", "lora", "omoe"])
def test_a_frozen_layer_survives_save_and_load(name, token_ids, tmp_path):
    adapter = inject(tiny_llama(), _frozen_middle(name))
    expected, loaded = _saved_and_loaded(adapter, token_ids, tmp_path)
    torch.testing.assert_close(loaded.model(token_ids).logits, expected, rtol=0, atol=1e-6)
    assert loaded.allocation.rank == [adapter.allocation.rank[0], 0, adapter.allocation.rank[2]]
