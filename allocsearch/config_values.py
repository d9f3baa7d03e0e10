"""Config values as users write them: a float may arrive as ``1e-3`` from YAML or ``"1e-3"`` from JSON."""
from __future__ import annotations

import numbers


def as_float(value) -> float | None:
    """``value`` as a float when it is a real number or a string holding one (booleans are not), else None."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)
