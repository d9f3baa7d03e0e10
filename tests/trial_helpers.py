"""Helpers for the behaviour tests of the training loop and the trial runner (tiny-llama, CPU, fp32)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

CPU = torch.device("cpu")


def sst2_splits(train=8, validation=4, test=2, seed=0):
    """Bundled SST-2 examples: every target is " negative" / " positive" (9 bytes + eos = 10 tokens)."""
    from allocsearch.data import DataSpec, TaskSpec, load_splits

    return load_splits(DataSpec([TaskSpec("sst2", train, validation, test)], seed=seed))


def build(*, method="mola", experts=3, top_k=2, rank=2, dropout=0.0, options=None, model_seed=0, init_seed=0,
          b_std=0.0, max_length=64, targets=None):
    """(adapter, encoder) on a fresh tiny-llama; the same seeds give bit-identical weights.
    ``b_std > 0`` draws lora_B from N(0, b_std) so the adapter changes the output from the start."""
    from allocsearch import AllocationConfig
    from allocsearch.training.encode import Encoder
    from allocsearch.training.models import load_model
    from allocsearch.moe.inject import inject

    loaded = load_model("tiny-llama", device="cpu", dtype="fp32", seed=model_seed)
    kw = {"targets": targets} if targets else {}
    alloc = AllocationConfig.uniform(method, loaded.num_layers, experts=experts, top_k=top_k, rank=rank,
                                     dropout=dropout, options=options, **kw)
    torch.manual_seed(init_seed)
    adapter = inject(loaded.model, alloc)
    if b_std:
        gen = torch.Generator().manual_seed(init_seed + 100)
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.experts.lora_B.copy_(torch.randn(layer.experts.lora_B.shape, generator=gen) * b_std)
    return adapter, Encoder(loaded.tokenizer, "causal-lm", max_length)


def named_trainable(adapter) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in adapter.trainable_parameters()}
    return {n: p for n, p in adapter.model.named_parameters() if id(p) in ids}


def snapshot(adapter) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named_trainable(adapter).items()}


@contextlib.contextmanager
def record_optimizer_steps(monkeypatch):
    """Record, at every AdamW step, each parameter's gradient (as the optimizer sees it) and the lr."""
    calls: list[dict] = []
    orig = torch.optim.AdamW.step

    def step(self, *a, **k):
        grads = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                 if p.grad is not None}
        calls.append({"lr": self.param_groups[0]["lr"], "grads": grads})
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    yield calls


def grads_by_name(adapter, call: dict) -> dict[str, torch.Tensor]:
    return {n: call["grads"][id(p)] for n, p in named_trainable(adapter).items() if id(p) in call["grads"]}


def np_softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_topk_counts(logits: np.ndarray, k: int) -> np.ndarray:
    """How many tokens chose each expert among their k highest router logits (softmax is monotone)."""
    counts = np.zeros(logits.shape[-1])
    for row in logits:
        counts[np.argsort(-row, kind="stable")[:k]] += 1
    return counts


def np_redundancy(lora_a: np.ndarray, lora_b: np.ndarray, n: int, r: int) -> float:
    """Mean over expert pairs of ||B_i A_i - B_j A_j||_F, with the d_out x d_in products formed."""
    full = [lora_b[:, i * r:(i + 1) * r] @ lora_a[i * r:(i + 1) * r] for i in range(n)]
    return float(np.mean([np.linalg.norm(full[i] - full[j]) for i in range(n) for j in range(i + 1, n)]))
