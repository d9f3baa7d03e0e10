"""What allocsearch knows of a model before anything loads: where its config.json is, and what it says.

A model is named as ``allocsearch.training.models.load_model`` takes it, by the same rule, in the same order:

* a registry name (``smollm2-135m``, ``minilm-l6``, ``tiny-llama``): its config is ``REGISTRY_CONFIGS`` (its
  files may not be installed yet);
* a local folder with ``config.json`` (a ``save_pretrained`` folder);
* a HF id (``org/name``) already in the local HF cache (``$HF_HOME/hub``): found by huggingface_hub's offline
  cache lookup, never downloaded.

Anything else raises :class:`ModelInfoError` with one line naming the fix. Depth (``space_models.model_depth``),
family (``allocation.model_family``) and the cost prior's size (``budget.prior_for``) all read ``model_config``.
No torch, no transformers, no weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from allocsearch.errors import AllocsearchError

# the registry models' config.json, as far as the search needs it
REGISTRY_CONFIGS = {
    "smollm2-135m": {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
    "minilm-l6": {"model_type": "bert", "num_hidden_layers": 6, "hidden_size": 384, "intermediate_size": 1536,
                  "num_attention_heads": 12, "vocab_size": 30522},
    "tiny-llama": {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259},
}
_HF_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # what load_model looks up in the HF cache
# config.json model_type -> the family allocsearch adapts: "llama" (gated MLPs) or "bert"
MODEL_FAMILIES = {"llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama", "gemma": "llama",
                  "gemma2": "llama", "phi3": "llama", "olmo": "llama", "olmo2": "llama", "smollm3": "llama",
                  "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert"}


class ModelInfoError(AllocsearchError, ValueError):
    """A model name that is no registry name, local model folder or cached HF id (one line, with the fix)."""


def absolute(model: str) -> str:
    """A local model path as an absolute, resolved path (``./m`` and its absolute path are the same model);
    registry names, HF ids and paths that do not exist come back unchanged."""
    if model in REGISTRY_CONFIGS:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def config_path(model: str) -> Path | None:
    """Where ``model``'s config.json is: None for a registry name (``REGISTRY_CONFIGS`` holds its config), the
    file in a local folder, or the cached file of a HF id."""
    if model in REGISTRY_CONFIGS:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelInfoError(f"model {model}: {path} has no config.json; fix: pass a folder written by "
                                 "save_pretrained (config.json and the weights)")
        return path / "config.json"
    if path.is_file() and path.suffix == ".gguf":
        raise ModelInfoError(f"model {model} is a .gguf file, whose depth a search cannot read before loading it; "
                             "fix: load it once and save_pretrained it to a folder, then pass that folder")
    cached = _hf_cached(model, "config.json") if not path.exists() and _HF_ID.fullmatch(model) else None
    if cached is None:
        hint = f", or download it first (hf download {model})" if _HF_ID.fullmatch(model) else ""
        raise ModelInfoError(f"model {model!r} is not a known model or a local folder with config.json, nor a HF "
                             f"id in the local HF cache; fix: use {', '.join(REGISTRY_CONFIGS)}, the path of a "
                             f"local model folder{hint}")
    return cached


def _hf_cached(repo_id: str, filename: str) -> Path | None:
    """The cached file of a HF repo (revision main) in the HF cache load_model reads, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def model_config(model: str) -> dict:
    """``model``'s config.json as a mapping (a registry name's from ``REGISTRY_CONFIGS``)."""
    path = config_path(model)
    if path is None:
        return dict(REGISTRY_CONFIGS[model])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelInfoError(f"model {model}: {path} cannot be read ({exc.__class__.__name__}); fix: point at a "
                             "folder written by save_pretrained") from None
    if not isinstance(data, dict):
        raise ModelInfoError(f"model {model}: {path} is not a JSON mapping; fix: point at a transformers model folder")
    return data


def depth(config: dict) -> int | None:
    """Transformer blocks of a config, or None when it does not say."""
    value = config.get("num_hidden_layers", config.get("n_layer", config.get("num_layers")))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def estimate_params(config: dict) -> float | None:
    """Parameters of a transformer from its config (embeddings + blocks: attention with grouped K/V, a gated
    three-matrix MLP for Llama-style models, two matrices otherwise), or None without the sizes."""
    hidden, layers = config.get("hidden_size"), depth(config)
    if not isinstance(hidden, int) or hidden <= 0 or layers is None:
        return None
    heads = config.get("num_attention_heads") or 1
    kv_dim = hidden * (config.get("num_key_value_heads") or heads) / heads
    inner = config.get("intermediate_size") or 4 * hidden
    mlp = (3 if MODEL_FAMILIES.get(config.get("model_type")) == "llama" else 2) * hidden * inner
    return float(layers * (2 * hidden * hidden + 2 * hidden * kv_dim + mlp) + (config.get("vocab_size") or 0) * hidden)
