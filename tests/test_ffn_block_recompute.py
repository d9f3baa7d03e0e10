"""The FFN-block form's ``recompute_experts``: the same outputs and gradients (dropout masks replayed), and
far fewer bytes kept for backward, the per-slot (tokens x K x d_ff) intermediates being recomputed."""
from __future__ import annotations

import pytest
import torch

from allocsearch import preset
from allocsearch.moe import inject
from conftest import tiny_llama

IDS = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(3))


def run(method: str, recompute: bool):
    """(logits, {param name: grad}, bytes saved for backward) of one training forward + backward."""
    options = {"recompute_experts": recompute, "load_balance_coef": 0.01} if method == "mixlora" else \
        {"recompute_experts": recompute, "edge_density": 0.5, "gcn_hidden": 16, "node_dim": 8}
    alloc = preset(method, 3, dropout=0.1, options=options)
    adapter = inject(tiny_llama(hidden=32), alloc)
    torch.manual_seed(0)
    for p in adapter.trainable_parameters():  # non-zero B: every expert path carries gradient
        if p.dim() == 2:
            p.data.normal_(0, 0.05)
    adapter.model.train()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = adapter.model(input_ids=IDS).logits
    (logits.float().pow(2).mean() + adapter.aux_loss()).backward()
    grads = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, sum(saved)


@pytest.mark.parametrize("method", ["mixlora", "graphlora"])
def test_recompute_experts_gives_the_same_result_with_less_kept_for_backward(method):
    base_out, base_grads, base_bytes = run(method, False)
    out, grads, kept = run(method, True)
    assert torch.allclose(out, base_out, atol=1e-6)
    assert grads.keys() == base_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], base_grads[name], atol=1e-6, rtol=1e-5), name
    # per block: tokens (96) x K (2) x d_ff (64) x 4 bytes x (gate, up, act, product, dropout) no longer kept
    per_slot = 96 * 2 * 64 * 4
    assert base_bytes - kept >= 3 * 3 * per_slot, (base_bytes, kept)
