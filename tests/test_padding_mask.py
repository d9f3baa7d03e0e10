"""Routers count only real tokens: the Adapter hands each forward's attention_mask to its MoE layers, so
expert load, the Switch load balance (MoLA, OMoE) and GraphLoRA's Poisson / Normal losses leave padding
positions out; without a mask every position counts."""
from __future__ import annotations

import pytest
import torch

from allocsearch.allocation.config import AllocationConfig
from allocsearch.moe.base import pooled_load_balance
from allocsearch.moe.inject import inject
from allocsearch.moe.losses import pooled_switch_load_balance, switch_stats
from allocsearch.moe.routers import topk_route
from conftest import tiny_bert, tiny_llama

IDS = torch.randint(0, 80, (3, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [0] * 7 + [1] * 3])  # right and left padding
REAL = int(MASK.sum())  # 19 of 30 positions


def adapter_for(method: str, model, **kw):
    alloc = AllocationConfig.uniform(method, model.config.num_hidden_layers, experts=4, top_k=2, rank=2,
                                     dropout=0.0, **kw)
    return inject(model, alloc)


@pytest.mark.parametrize("make, targets", [(tiny_llama, None), (tiny_bert, ["query", "value"])],
                         ids=["llama", "bert"])
def test_expert_load_counts_only_real_tokens(make, targets):
    adapter = adapter_for("mola", make(), **({"targets": targets} if targets else {}))
    adapter.track_load(True)
    with torch.no_grad():
        adapter.model(input_ids=IDS, attention_mask=MASK)
    for layer in adapter.layers.values():  # top-2 picks of each real token, none of the padding
        assert float(layer.load_counts.sum()) == 2 * REAL
    adapter.track_load(True)
    with torch.no_grad():
        adapter.model(IDS, MASK)  # the mask as transformers' second positional argument
    assert all(float(layer.load_counts.sum()) == 2 * REAL for layer in adapter.layers.values())
    adapter.track_load(True)
    with torch.no_grad():
        adapter.model(input_ids=IDS)  # no mask: every position is real
    assert all(float(layer.load_counts.sum()) == 2 * IDS.numel() for layer in adapter.layers.values())


def test_switch_load_balance_is_computed_over_the_real_tokens():
    model = tiny_llama()
    alloc = AllocationConfig.uniform("mola", 3, experts=4, top_k=2, rank=2, dropout=0.0, targets=["q", "v"],
                                     options={"load_balance_coef": 0.01})
    adapter = inject(model, alloc)
    inputs = {}
    for path, layer in adapter.layers.items():
        layer.register_forward_pre_hook(lambda m, a, path=path: inputs.__setitem__(path, a[0].detach()))
    adapter.model.train()
    adapter.model(input_ids=IDS, attention_mask=MASK)
    loss = pooled_load_balance(adapter.layers.values())
    real = MASK.reshape(-1).bool()
    expected, every = 0.0, 0.0
    for j in range(3):  # by hand: router of each module on its real rows, pooled per decoder layer
        parts, parts_all = [], []
        for path, layer in adapter.layers.items():
            if layer.layer_index == j:
                x = inputs[path].reshape(-1, layer.in_features)
                route = topk_route(x @ layer.router.t(), 2)
                parts.append(switch_stats(route.probs[real], route.index[real]))
                parts_all.append(switch_stats(route.probs, route.index))
        expected += 0.01 * pooled_switch_load_balance(parts).item()
        every += 0.01 * pooled_switch_load_balance(parts_all).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - every) > 1e-6  # the padding rows would have changed it


@pytest.mark.parametrize("scope", ["linear", "ffn_block"])
def test_graphloras_activation_history_and_losses_see_only_real_tokens(scope):
    model = tiny_llama()
    kw = {"router_scope": scope} if scope == "ffn_block" else {"targets": ["q"]}
    adapter = adapter_for("graphlora", model, **kw)
    adapter.model.train()
    adapter.model(input_ids=IDS, attention_mask=MASK)
    for layer in adapter.layers.values():
        if hasattr(layer, "activation_total"):  # top-K weights of a token sum to 1: one unit per real token
            assert float(layer.activation_total.sum()) == pytest.approx(REAL, rel=1e-5)
    assert isinstance(adapter.aux_loss(), torch.Tensor)


def test_a_mask_that_does_not_fit_the_positions_counts_everything():
    adapter = adapter_for("mola", tiny_llama())
    adapter.track_load(True)
    with torch.no_grad():  # a 4-D mask (or a generation step's cache-long mask) is not a per-position mask
        adapter.model(input_ids=IDS, attention_mask=MASK[:, None, None, :].expand(3, 1, 10, 10).float())
    assert all(float(layer.load_counts.sum()) == 2 * IDS.numel() for layer in adapter.layers.values())
