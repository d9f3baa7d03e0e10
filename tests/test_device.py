"""Every tensor an adapter makes lives on its base weights' device (issue 13: a CPU ``load_counts`` buffer
failed every MoE trial's final evaluation on CUDA), checked without a GPU: the model's weights go to the
``meta`` device, the adapter is injected, trained one step, its aux losses taken and its expert load tracked
as the final evaluation does, then every parameter, gradient and buffer must still be on meta. Then the same
in bf16 on the CPU, where the values can be read: finite loss, finite gradients, expert loads that add up.
Every registered method, in both router scopes where it has both."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from allocsearch import AllocationConfig
from allocsearch.training.evaluate import autocast_context
from allocsearch.allocation.methods import FFN_TARGETS, METHOD_NAMES, get_method
from allocsearch.moe import inject
from allocsearch.moe.base import load_count_dtype
from conftest import tiny_llama

L = 2
OPTIONS = {  # small routers; every optional loss on, so its code runs
    "mola": {"load_balance_coef": 0.01},
    "graphlora": {"edge_density": 0.5, "gcn_hidden": 8, "node_dim": 4},
    "omoe": {"placement": "all", "load_balance_coef": 0.01},
}
BLOCK_OPTIONS = {"recompute_experts": True}  # ffn_block: the checkpointed slot path too


def scopes(method: str) -> tuple[str, ...]:
    return ("linear", "ffn_block") if get_method(method).block_layer else ("linear",)


CASES = [(m, s) for m in METHOD_NAMES for s in scopes(m)]


def allocation(method: str, scope: str) -> AllocationConfig:
    """Experts on the FFN projections, plain LoRA (one expert, no router) on attention; dropout on, so
    training runs the unfused projections and evaluation the fused ones."""
    if get_method(method).peft:
        return AllocationConfig.uniform(method, L, experts=1, top_k=1, rank=2)
    experts = 3
    top_k = experts if method in ("loracoe", "omoe") else 2  # LoRACoE averages all E; OMoE soft routing
    options = {**OPTIONS.get(method, {}), **(BLOCK_OPTIONS if scope == "ffn_block" else {})}
    return AllocationConfig.uniform(method, L, experts=experts, top_k=top_k, rank=2, dropout=0.1,
                                    moe_targets=FFN_TARGETS, router_scope=scope, options=options)


def test_every_registered_method_and_scope_is_covered():
    assert {m for m, _ in CASES} == set(METHOD_NAMES)
    assert ("mola", "ffn_block") in CASES and ("graphlora", "ffn_block") in CASES


def phases(method: str) -> tuple[str | None, ...]:
    return get_method(method).phases or (None,)


def train_step(adapter, method: str, **batch) -> torch.Tensor:
    """One training forward + backward (+ aux losses) in each of the method's phases; the last loss."""
    model = adapter.model.train()
    for phase in phases(method):
        if phase is not None:
            adapter.set_phase(phase)
        loss = model(**batch).loss + adapter.aux_loss()
        loss.backward()
    return loss


def track_load(adapter, **batch) -> dict[str, list[float]] | None:
    """The final evaluation's expert-load pass (trial.run_trial + evaluate): tracking on, eval mode, inference
    mode. Returns the loads unless the weights are on meta, whose values cannot be read."""
    adapter.track_load(True)
    with torch.inference_mode():
        adapter.model.eval()(**batch)
    meta = next(adapter.model.parameters()).is_meta
    loads = None if meta else adapter.expert_load()
    adapter.track_load(False)
    return loads


def off_device(model: torch.nn.Module, device: str) -> list[str]:
    """Every parameter, gradient and buffer of ``model`` that is not on ``device``."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers(),
                              ((f"{n}.grad", p.grad) for n, p in model.named_parameters() if p.grad is not None))
    return [f"{name} on {t.device}" for name, t in tensors if t.device.type != device]


@pytest.mark.parametrize("method,scope", CASES)
def test_every_adapter_tensor_follows_the_weights_to_their_device(method, scope):
    model = tiny_llama(layers=L).to("meta")
    adapter = inject(model, allocation(method, scope))
    # no attention_mask: transformers' own mask code reads its values, which meta tensors do not have
    ids = torch.randint(0, 96, (2, 7)).to("meta")
    loss = train_step(adapter, method, input_ids=ids, labels=ids)
    assert loss.is_meta
    track_load(adapter, input_ids=ids)
    assert adapter.layers or get_method(method).peft
    for layer in adapter.layers.values():
        assert layer.load_counts.dtype == load_count_dtype(torch.device("meta"))
    assert off_device(model, "meta") == []


def padded_batch():
    """Two sequences, the second right-padded: the padding must not reach the routers' statistics."""
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("masters", ["fp32", "bf16"])
@pytest.mark.parametrize("method,scope", CASES)
def test_bf16_weights_give_a_finite_loss_finite_gradients_and_expert_loads(method, scope, masters):
    """``masters="fp32"``: the trial's way (bf16 frozen model, fp32 adapter weights, bf16 autocast);
    ``"bf16"``: everything in bf16, no autocast, so every tensor the adapter makes must follow bf16."""
    model = tiny_llama(layers=L).to(torch.bfloat16)
    adapter = inject(model, allocation(method, scope))
    params = adapter.trainable_parameters()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            if masters == "fp32":
                p.data = p.data.float()  # as trial.build_adapter
            if p.dim() == 2:  # non-zero B: gradient reaches every part of every expert
                p.normal_(0, 0.05)
    if not get_method(method).peft:  # peft keeps its adapters in fp32 itself (autocast_adapter_dtype)
        assert {p.dtype for p in params} == {torch.float32 if masters == "fp32" else torch.bfloat16}
    batch = padded_batch()
    cast = autocast_context(torch.device("cpu"), torch.bfloat16) if masters == "fp32" else contextlib.nullcontext()
    with cast:
        loss = train_step(adapter, method, **batch)
        loads = track_load(adapter, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.isfinite(loss)
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad.float()).all()
    routed = [sum(load) for load in loads.values() if sum(load) > 0]
    assert routed == pytest.approx([1.0] * len(routed))
    assert routed or get_method(method).peft, "no layer tracked any expert load"
    assert off_device(model, "cpu") == []


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cuda", torch.float64),
                                          ("meta", torch.float64), ("mps", torch.float32)])
def test_load_counts_are_float64_except_on_mps_which_has_none(device, dtype):
    assert load_count_dtype(torch.device(device)) == dtype
