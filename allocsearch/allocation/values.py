"""Config values as users write them: a float may arrive as ``1e-3`` from YAML or ``"1e-3"`` from JSON; a
dataclass field's declared type says what a value must be, and a wrong one is one line naming the key."""
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


def typed(key: str, kind: str, value, error: type[Exception], *, integral_floats: bool = False):
    """``value`` checked against a dataclass field's type ``kind`` (its annotation as text: "float",
    "int | None", "str", "bool", ...); floats written as strings are read; ``integral_floats`` also takes
    3.0 for an int. Raises ``error("<key>: expected <type>, got <value>")``; other kinds pass unchanged."""
    if value is None and "None" in kind:
        return None
    if kind.startswith("float"):
        number = as_float(value)
        if number is None:
            raise error(f"{key}: expected a number, got {value!r:.60}")
        return number
    if kind.startswith("int"):
        if integral_floats and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise error(f"{key}: expected a whole number{' or null' if 'None' in kind else ''}, got {value!r:.60}")
        return int(value)
    if kind == "str" and not isinstance(value, str):
        raise error(f"{key}: expected a string, got {value!r:.60}")
    if kind == "bool" and not isinstance(value, bool):
        raise error(f"{key}: expected true or false, got {value!r:.60}")
    return value
