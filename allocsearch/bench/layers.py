"""``allocsearch bench layers``: forward+backward time of one wrapped Linear, every method side by side.

Each case wraps the same frozen ``d_in -> d_out`` Linear (SmolLM2's shapes by default) and runs
forward + backward on ``tokens`` tokens (the input requires grad, as inside a model whose earlier layers
are adapted). Cases run round-robin, one timing each per round, so machine noise hits all of them alike;
the table reports medians and ratios of medians against the named reference measured in the same run.
Dropout is 0 everywhere: the benchmark times the math, not the RNG. The FFN-block section (one whole
gated MLP, ``router_scope`` linear vs ffn_block) lives in :mod:`allocsearch.bench.ffn` and shares the timer.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from allocsearch.allocation.config import AllocationConfig
from allocsearch.allocation.methods import get_method


@dataclass
class Case:
    name: str
    build: Callable[[nn.Linear], Callable[[torch.Tensor], torch.Tensor]]
    reference: str | None = None  # ratio against this case
    note: str = ""
    also: tuple[str, ...] = ()  # further cases to report a ratio against (row "also": {case: ratio})


def _ours(method: str, experts: int, top_k: int, rank: int, *, unfused: bool = False, **options):
    def build(base: nn.Linear):
        alloc = AllocationConfig.uniform(method, 1, experts=experts, top_k=top_k, rank=rank,
                                         dropout=0.0, targets=["q"], options=options or None)
        layer = get_method(method).layer_class()(
            base, experts=experts, top_k=top_k, rank=rank, alpha=2.0 * rank, dropout=0.0,
            options=alloc.options, layer_index=0, num_layers=1, target="q")
        return _Unfused(layer) if unfused else layer
    return build


class _Unfused(nn.Module):
    """Runs a LoRACoE layer through its reference (unfused) form."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer.base(x) + self.layer.delta_unfused(x)


def _peft_lora(rank: int, dora: bool = False):
    def build(base: nn.Linear):
        from peft import LoraConfig, get_peft_model

        holder = nn.Module()
        holder.lin = base
        model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=["lin"], use_dora=dora))
        return model.base_model.model.lin
    return build


def _frozen(base: nn.Linear):
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def default_cases() -> list[Case]:
    return [
        Case("frozen Linear only", _frozen, None, "the floor: W0 forward + input grad"),
        Case("LoRA r16 (peft)", _peft_lora(16), None, "reference for top-2 of 8 r8"),
        Case("LoRA r32 (peft)", _peft_lora(32), None, "reference for 2 soft r16"),
        Case("LoRA r64 (peft)", _peft_lora(64), None, "reference for dense 8 r8"),
        Case("MoLA top-2 of 8, r8", _ours("mola", 8, 2, 8), "LoRA r16 (peft)", "target <= 1.2x"),
        Case("dense 8 experts r8 (LoRAMoE)", _ours("mola", 8, 8, 8), "LoRA r64 (peft)"),
        Case("LoRACoE r16 E2 fused", _ours("loracoe", 2, 2, 16), "LoRA r16 (peft)", "target <= 1.1x"),
        Case("LoRACoE r16 E2 unfused", _ours("loracoe", 2, 2, 16, unfused=True), "LoRACoE r16 E2 fused",
             "fused should be >= 20% faster"),
        Case("GraphLoRA top-2 of 8, r8", _ours("graphlora", 8, 2, 8), "MoLA top-2 of 8, r8",
             "GCN 256 (paper); target <= 1.5x"),
        Case("GraphLoRA top-2 of 8, r8, GCN 64", _ours("graphlora", 8, 2, 8, gcn_hidden=64),
             "MoLA top-2 of 8, r8", "target <= 1.5x"),
        Case("OMoE 2 soft r16 (orthogonal)", _ours("omoe", 2, 2, 16, placement="all"), "LoRA r32 (peft)"),
    ]


def run(shapes=((576, 576), (576, 1536)), tokens: int = 2048, repeats: int = 20, warmup: int = 3,
        device: str = "cpu", dtype: str = "fp32", cases: list[Case] | None = None, progress=None) -> list[dict]:
    """Time every case at every shape; returns one row per (shape, case) with median ms and ratio."""
    rows = []
    for d_in, d_out in shapes:
        rows += time_cases(cases or default_cases(), lambda: nn.Linear(d_in, d_out, bias=False), d_in, d_out,
                           f"{d_in}->{d_out}", tokens=tokens, repeats=repeats, warmup=warmup, device=device,
                           dtype=dtype, progress=progress)
    return rows


def time_cases(cases: list[Case], make_base: Callable[[], nn.Module], d_in: int, d_out: int, label: str, *,
               tokens: int, repeats: int, warmup: int, device: str, dtype: str, progress=None) -> list[dict]:
    """Build every case on a fresh ``make_base()`` (same seed), time them round-robin on ``tokens`` inputs
    of width ``d_in`` (gradients of width ``d_out``), and return the rows of shape ``label``."""
    dev = torch.device(device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    torch.manual_seed(0)
    fns = {case.name: case.build(make_base().to(dev, dt)).to(dev, dt).train() for case in cases}
    x = torch.randn(tokens, d_in, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=dev, dtype=dt)
    med = time_round_robin(fns, x, grad, dev, repeats=repeats, warmup=warmup, progress=progress, label=label)
    return result_rows(cases, med, shape=label, tokens=tokens, device=device, dtype=dtype, repeats=repeats)


def time_round_robin(fns: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, dev: torch.device, *,
                     repeats: int, warmup: int, progress=None, label: str = "") -> dict[str, float]:
    """Median forward+backward ms of every module in ``fns``: each round times every module once, in order,
    so machine noise hits them alike; the first ``warmup`` rounds are not kept."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            ms = _time_once(fn, x, grad, dev)
            if rnd >= warmup:
                times[name].append(ms)
        if progress:
            progress(rnd + 1, warmup + repeats, label)
    return {name: statistics.median(v) for name, v in times.items()}


def result_rows(cases: list[Case], med: dict[str, float], **common) -> list[dict]:
    """One row per case: its median, the ratio to its reference and to each of its ``also`` cases."""
    rows = []
    for case in cases:
        ref = med.get(case.reference) if case.reference else None
        rows.append({"shape": common["shape"], "case": case.name, "median_ms": med[case.name],
                     "reference": case.reference, "ratio": med[case.name] / ref if ref else None,
                     "also": {name: med[case.name] / med[name] for name in case.also},
                     "note": case.note, **{k: v for k, v in common.items() if k != "shape"}})
    return rows


def _time_once(fn: nn.Module, x: torch.Tensor, grad: torch.Tensor, dev: torch.device) -> float:
    x.grad = None
    for p in fn.parameters():
        p.grad = None  # as after optimizer.zero_grad(): backward writes fresh gradients
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    fn(x).backward(grad)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - start) * 1000.0
