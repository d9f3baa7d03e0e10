"""The one exception family the CLI turns into a single clear line and a non-zero exit."""
from __future__ import annotations


class AllocsearchError(Exception):
    """User-facing error: the message names the problem and the fix, in one line."""


class AllocationError(AllocsearchError, ValueError):
    """An allocation config that cannot be built; the message names the field and the fix."""
