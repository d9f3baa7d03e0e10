"""What a search space needs to know of its model before anything loads: its depth (and its family,
``allocation.model_family``), both read from ``model_info.model_config``."""
from __future__ import annotations

from allocsearch.allocation.model_info import REGISTRY_CONFIGS, ModelInfoError, config_path, depth, model_config
from allocsearch.search.space.dims import SpaceError

MODEL_DEPTHS = {name: config["num_hidden_layers"] for name, config in REGISTRY_CONFIGS.items()}


def model_depth(model: str) -> int:
    """Transformer blocks of a registry model, a local folder or a cached HF id (its config's
    ``num_hidden_layers``); a one-line SpaceError for anything else."""
    try:
        blocks = depth(model_config(model))
    except ModelInfoError as exc:
        raise SpaceError(str(exc)) from None
    if blocks is None:
        raise SpaceError(f"model {model}: {config_path(model)} has no num_hidden_layers; fix: point at a "
                         "transformers model folder")
    return blocks
