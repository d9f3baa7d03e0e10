"""Wrap a Hugging Face model's target Linears per an allocation; freeze the rest; save and load adapters.

``inject(model, allocation)`` finds the model's transformer blocks (the ``nn.ModuleList`` with
``config.num_hidden_layers`` entries), resolves each target's short name (``q`` -> ``self_attn.q_proj``
for Llama-style decoders, ``query`` -> ``attention.self.query`` for BERT, or a dotted path inside the
block), and replaces it with the method's layer for that block's experts / top-k / rank. LoRA and DoRA go
through ``peft`` itself. The returned :class:`Adapter` is what a trainer needs: the model to run, the
trainable parameters (found by visiting the layer objects), the auxiliary loss of the last forward,
expert-load statistics, LoRACoE's phase switch, and ``save`` / :func:`load_adapter`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from allocsearch.allocation.config import AllocationConfig, AllocationError
from allocsearch.allocation.methods import get_method
from allocsearch.moe.adapter import (ADAPTER_FILE, CONFIG_FILE, META_FILE, PEFT_DIR, Adapter, adapter_of,
                                     replace_module, resolve_targets)
from allocsearch.moe.base import MoELoRALayer
from allocsearch.moe.ffn_block import inject_ffn_blocks

def inject(model: nn.Module, allocation: AllocationConfig, *, train_modules: tuple[str, ...] = ()) -> Adapter:
    """Freeze ``model`` and wrap its target Linears per ``allocation`` (in place; peft wraps the model).

    ``train_modules``: module names kept trainable and saved with the adapter (e.g. a classifier head).
    """
    spec = get_method(allocation.method)
    if allocation.router_scope == "ffn_block":  # one router per decoder layer on its MLP (GraphLoRA, MixLoRA)
        return inject_ffn_blocks(model, allocation, train_modules=tuple(train_modules))
    targets = resolve_targets(model, allocation)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.peft:
        return Adapter(_inject_peft(model, allocation, targets, train_modules), allocation, {}, tuple(train_modules))
    layer_cls = spec.layer_class()
    layers: dict[str, MoELoRALayer] = {}
    for j, target, path in targets:
        moe = allocation.is_moe_target(target)
        layers[path] = replace_module(model, path, lambda base: layer_cls(
            base, experts=allocation.experts[j] if moe else 1, top_k=allocation.top_k[j] if moe else 1,
            rank=allocation.rank[j], alpha=allocation.alpha, dropout=allocation.dropout,
            options=allocation.options, layer_index=j, num_layers=allocation.num_layers, target=target))
    return adapter_of(model, allocation, layers, train_modules)


def _inject_peft(model, allocation, targets, train_modules):
    from peft import LoraConfig, get_peft_model  # ~7 s to import: only for the peft methods

    names = [path for _, _, path in targets]
    ranks = {path: allocation.rank[j] for j, _, path in targets}
    base_rank = allocation.rank[allocation.adapted_layers[0]]
    config = LoraConfig(r=base_rank, lora_alpha=allocation.alpha, lora_dropout=allocation.dropout,
                        target_modules=names, use_dora=allocation.method == "dora", bias="none",
                        rank_pattern={k: v for k, v in ranks.items() if v != base_rank},
                        modules_to_save=list(train_modules) or None)
    training = model.training
    return get_peft_model(model, config).train(training)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> Adapter:
    """Inject the allocation saved at ``path`` into a fresh ``model`` and load the saved weights."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AllocationError(f"{path} is not an allocsearch adapter (no {CONFIG_FILE}): pass the directory "
                              f"written by Adapter.save or `allocsearch train --out`")
    allocation = AllocationConfig.load(path / CONFIG_FILE)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    train_modules = tuple(meta.get("train_modules", ()))
    if get_method(allocation.method).peft:
        from peft import PeftModel

        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = PeftModel.from_pretrained(model, path / PEFT_DIR).train(model.training)
        return Adapter(peft_model, allocation, {}, train_modules)
    adapter = inject(model, allocation, train_modules=train_modules)
    from safetensors.torch import load_file

    saved = load_file(path / ADAPTER_FILE)
    own = adapter._state()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    # GraphLoRA's running activation total is training state added later: older adapters start it at zero
    missing = [k for k in missing if not k.endswith(".activation_total")]
    if missing or unexpected:
        raise AllocationError(f"{path / ADAPTER_FILE} does not match its allocation: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, tensor in own.items():
            if key in saved:
                tensor.copy_(saved[key].to(tensor.dtype))
    return adapter
