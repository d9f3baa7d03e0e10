"""Import heavy optional dependencies on first use, with an install hint when they are missing."""
from __future__ import annotations

import importlib
from types import ModuleType

_HINTS = {
    "torch": "pip install torch  (CPU here: pip install torch==2.13.0)",
    "transformers": "pip install transformers",
    "peft": "pip install peft",
    "safetensors": "pip install safetensors",
    "gguf": "pip install gguf",
}


class MissingDependencyError(ImportError):
    """A feature needs a package that is not installed."""


def require(module: str, feature: str = "") -> ModuleType:
    """Import ``module`` or raise one clear line naming the package and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        top = module.split(".")[0]
        hint = _HINTS.get(top, f"pip install {top}")
        what = f" for {feature}" if feature else ""
        raise MissingDependencyError(f"{top} is needed{what} but is not installed: {hint}") from exc
