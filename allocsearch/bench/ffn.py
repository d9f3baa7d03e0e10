"""``allocsearch bench layers``, FFN-block section: forward+backward of one whole Llama-style gated MLP.

The unit that ``router_scope`` changes is the MLP, not one Linear: with ``linear`` each of gate/up/down
is wrapped with its own experts and router (3 routers), with ``ffn_block`` the MLP becomes one block layer
(MixLoRA / GraphLoRA's placement: one router, expert i the whole adapted MLP). Each case builds a one-block
model holding transformers' ``LlamaMLP`` (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn`` = SiLU;
SmolLM2's 576 x 1536 by default) and adapts it through the real injector (:func:`allocsearch.moe.inject`),
so the block cases run exactly the classes a trial gets (``get_method(m).layer_class("ffn_block")``).
The timed module is the block's ``mlp`` after injection; cases run round-robin in one process as in
:mod:`allocsearch.bench.layers`, and ratios compare medians of the same run.
"""
from __future__ import annotations

from torch import nn

from allocsearch.bench.layers import Case, time_cases

FFN_TARGETS = ["gate", "up", "down"]
LORA = "LoRA r16 (peft)"
MOLA_LINEAR = "MoLA top-2 of 8, r8, per-Linear"
GRAPH_LINEAR = "GraphLoRA top-2 of 8, r8, per-Linear"


def mlp_model(d: int, d_ff: int) -> nn.Module:
    """A one-block Llama-style model around one ``LlamaMLP``: what the injector needs (``config`` with
    ``model_type`` llama, a ModuleList of ``num_hidden_layers`` blocks, each with ``mlp``)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(vocab_size=8, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, hidden_act="silu", mlp_bias=False)
    model = nn.Module()
    model.config = config
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].mlp = LlamaMLP(config)
    return model


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.layers[0].mlp


def _injected(method: str, experts: int, top_k: int, rank: int, router_scope: str = "linear", **options):
    """Build: inject ``method`` into gate/up/down of the model's MLP with ``router_scope``; the timed module
    is the model's ``mlp`` afterwards (the block layer for ffn_block, the MLP with wrapped Linears else)."""
    def build(model: nn.Module) -> nn.Module:
        from allocsearch.allocation.config import AllocationConfig
        from allocsearch.moe.inject import inject

        alloc = AllocationConfig.uniform(method, 1, experts=experts, top_k=top_k, rank=rank, alpha=2.0 * rank,
                                         dropout=0.0, targets=FFN_TARGETS, router_scope=router_scope,
                                         options=options or None)
        inject(model, alloc)  # in place (peft too: its LoRA layers replace the Linears inside ``model``)
        return model.layers[0].mlp
    return build


def default_cases() -> list[Case]:
    return [
        Case("frozen MLP only", _frozen, None, "the floor: frozen gate/up/down + input grad"),
        Case(LORA, _injected("lora", 1, 1, 16), None, "on gate/up/down: reference for top-2 of 8 r8"),
        Case(MOLA_LINEAR, _injected("mola", 8, 2, 8), LORA, "router_scope linear: 3 routers (gate, up, down)"),
        Case("MixLoRA block: MoLA top-2 of 8, r8", _injected("mola", 8, 2, 8, "ffn_block"), MOLA_LINEAR,
             "router_scope ffn_block: 1 router", also=(LORA,)),
        Case(GRAPH_LINEAR, _injected("graphlora", 8, 2, 8), MOLA_LINEAR,
             "router_scope linear: 3 graph routers, GCN 256"),
        Case("GraphLoRA block top-2 of 8, r8", _injected("graphlora", 8, 2, 8, "ffn_block"), GRAPH_LINEAR,
             "router_scope ffn_block: 1 graph router, GCN 256", also=(LORA,)),
    ]


def shape_label(d: int, d_ff: int) -> str:
    return f"ffn {d}x{d_ff}"


def run(shapes=((576, 1536),), tokens: int = 2048, repeats: int = 20, warmup: int = 3, device: str = "cpu",
        dtype: str = "fp32", cases: list[Case] | None = None, progress=None) -> list[dict]:
    """Time every case on a ``d x d_ff`` gated MLP per shape; one row per (shape, case), shape "ffn DxF"."""
    rows = []
    for d, d_ff in shapes:
        rows += time_cases(cases or default_cases(), lambda: mlp_model(d, d_ff), d, d, shape_label(d, d_ff),
                           tokens=tokens, repeats=repeats, warmup=warmup, device=device, dtype=dtype,
                           progress=progress)
    return rows
