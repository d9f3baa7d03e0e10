"""allocsearch: search the expert allocation of mixture-of-LoRA-experts fine-tuning under a budget.

The public API is re-exported here. Importing this package stays light: torch, transformers, peft,
ray and mlflow load only when a function that needs them runs (see ``allocsearch._imports``).
"""
from __future__ import annotations

from allocsearch.allocation.config import SCHEMA_VERSION, AllocationConfig, AllocationError
from allocsearch.allocation.config import preset
from allocsearch.allocation.methods import METHOD_NAMES, PRESETS, get_method
from allocsearch.allocation.shapes import SHAPES, shape_experts

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "AllocationConfig",
    "AllocationError",
    "METHOD_NAMES",
    "PRESETS",
    "SHAPES",
    "get_method",
    "inject",
    "load_adapter",
    "preset",
    "shape_experts",
]


def inject(model, allocation):  # noqa: D401 - thin lazy wrapper
    """Wrap ``model``'s target Linears per ``allocation``; see :func:`allocsearch.moe.inject.inject`."""
    from allocsearch.moe.inject import inject as _inject

    return _inject(model, allocation)


def load_adapter(model, path):
    """Inject and load a saved adapter; see :func:`allocsearch.moe.inject.load_adapter`."""
    from allocsearch.moe.inject import load_adapter as _load

    return _load(model, path)
