"""The shared MoE-LoRA layer library: one module per method, each wrapping a frozen ``nn.Linear``.

Importing this subpackage imports torch. Use :func:`allocsearch.moe.inject.inject` to wrap a model.
"""
from allocsearch.moe.base import MoELoRALayer
from allocsearch.moe.adapter import Adapter
from allocsearch.moe.inject import inject, load_adapter

__all__ = ["Adapter", "MoELoRALayer", "inject", "load_adapter"]
