"""What a search space needs to know of its model before anything loads: its depth (and its family,
``allocation.model_family``)."""
from __future__ import annotations

import json
from pathlib import Path

from allocsearch.allocation import REGISTRY_MODELS
from allocsearch.search.space_dims import SpaceError

MODEL_DEPTHS = {name: depth for name, (_, depth) in REGISTRY_MODELS.items()}


def model_depth(model: str) -> int:
    """Transformer blocks of a known model name, or ``num_hidden_layers`` of a local folder's config.json."""
    if model in MODEL_DEPTHS:
        return MODEL_DEPTHS[model]
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            depth = data.get("num_hidden_layers", data.get("n_layer", data.get("num_layers")))
        except (OSError, ValueError, AttributeError):
            depth = None
        if isinstance(depth, int) and depth > 0:
            return depth
        raise SpaceError(f"model {model}: {config} has no num_hidden_layers; fix: point at a transformers model folder")
    raise SpaceError(f"model {model!r} is not a known model or a local folder with config.json; fix: use "
                     f"{', '.join(MODEL_DEPTHS)} or the path of a local model folder")
