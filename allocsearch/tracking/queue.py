"""The tracker's operation queue: MLflow calls run in order; while the tracking server is unreachable they
stay in memory and are retried with back-off (one warning per outage), and an operation a retry cannot fix
is dropped with a warning. Nothing here raises into the search."""
from __future__ import annotations

import math
import sys
from collections import deque
from typing import Callable

RETRY_FIRST, RETRY_MAX = 5.0, 60.0  # back-off between retries while the tracking server is unreachable
MAX_QUEUE = 50_000  # beyond this, droppable operations (checkpoint and tick metrics) are not queued
# MLflow error codes a retry cannot fix: that one operation is dropped with a warning
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
             "INVALID_STATE", "MALFORMED_REQUEST"}


class OpQueue:
    """``push(fn, *args)`` then ``flush()``; ``where`` names the server in the warnings."""

    def __init__(self, where: str, clock: Callable[[], float]):
        self.where, self.clock = where, clock
        self._ops: deque = deque()  # (function, args)
        self._down_since: float | None = None
        self._retry_at, self._backoff = -math.inf, RETRY_FIRST
        self._dropped = 0

    def __len__(self) -> int:
        return len(self._ops)

    def push(self, fn, *args, droppable: bool = False) -> None:
        if droppable and len(self._ops) >= MAX_QUEUE:
            return
        self._ops.append((fn, args))

    def flush(self, force: bool = False) -> bool:
        """Run the queued operations in order; True when none is left. While the server is down, retries
        only when its back-off has passed (``force`` ignores it)."""
        if not force and self.clock() < self._retry_at:
            return False
        while self._ops:
            fn, args = self._ops[0]
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001
                if permanent(exc):
                    self._ops.popleft()
                    self._dropped += 1
                    if self._dropped <= 5:
                        warn(f"mlflow: dropped {fn.__name__.lstrip('_')} ({short(exc)})")
                    continue
                if self._down_since is None:
                    self._down_since = self.clock()
                    warn(f"mlflow: tracking at {self.where} failed ({short(exc)}); keeping {len(self._ops)} "
                         "operations in memory to retry; the search goes on")
                self._retry_at = self.clock() + self._backoff
                self._backoff = min(2 * self._backoff, RETRY_MAX)
                return False
            self._ops.popleft()
        if self._down_since is not None:
            warn(f"mlflow: tracking at {self.where} is back; the queued operations are logged")
            self._down_since = None
        self._retry_at, self._backoff = -math.inf, RETRY_FIRST
        return True


def permanent(exc: Exception) -> bool:
    """True: a retry cannot help (bad request, or a bug here): drop the operation. False: retry later."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in PERMANENT
    return not isinstance(exc, (OSError, ConnectionError, TimeoutError))


def short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
