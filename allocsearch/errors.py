"""The one exception family the CLI turns into a single clear line and a non-zero exit."""
from __future__ import annotations


class AllocsearchError(Exception):
    """User-facing error: the message names the problem and the fix, in one line."""
