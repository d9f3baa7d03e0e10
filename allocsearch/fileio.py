"""Files on disk: YAML read only with a safe loader (never a user object constructed), and
writes that are atomic (temp file + rename), so a killed process never leaves half a file. Written files
get the umask's permissions (``0o666 & ~umask``), like any ``open(path, "w")``: ``mkstemp`` alone would make
them 0600.

PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string; users write learning rates that way, so the
loader here also reads YAML 1.2 floats (``1e-3``, ``5E+2``) as numbers. Everything else is ``safe_load``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

_FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # replace the YAML 1.1 float resolver by one that also takes 1e-3; ints keep their own resolver
    Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
    return Loader


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-3`` is a number)."""
    import yaml

    return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | os.PathLike, what: str, error: type[Exception]) -> Any:
    """Parse a YAML (or JSON) file; a missing file or bad syntax raises ``error`` with one line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; fix: check the path")
    try:
        return load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path} is not valid YAML{at} ({problem}); fix: correct the YAML syntax") from None


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status``); elsewhere
    set-and-restore under a lock (the umask is process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a plain ``mkdir`` would give a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON file holding an object, or None when it is missing, unreadable or not an object (for files
    this package wrote itself, read back where a gap is expected: a trial still running, an old study)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, file_mode())  # mkstemp makes it 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
