"""Files on disk: YAML read only with ``yaml.safe_load`` (never a user object constructed), and
writes that are atomic (temp file + rename), so a killed process never leaves half a file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def read_yaml(path: str | os.PathLike, what: str, error: type[Exception]) -> Any:
    """Parse a YAML (or JSON) file; a missing file or bad syntax raises ``error`` with one line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; fix: check the path")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path} is not valid YAML{at} ({problem}); fix: correct the YAML syntax") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
