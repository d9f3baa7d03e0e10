"""Fault injection the system tests own: installed into a controller subprocess before the CLI starts, never
imported by allocsearch (production code has no test hooks). ``harness.Run(case, args, fault="...")`` runs

    python -c "import faults; faults.kill_before_tell(1); from allocsearch.cli import main; main()" start ...

with this folder on the subprocess's PYTHONPATH, so only that controller carries the fault (a resume of the
same study runs the plain ``python -m allocsearch start``).
"""
from __future__ import annotations

import os
import signal


def kill_before_tell(number: int) -> None:
    """SIGKILL this process when trial ``number``'s end reaches Optuna's tell.

    ``Bookkeeper.end`` records a trial's end in one order: results.json (if the worker could not write it)
    -> the ledger's final record -> ``Bookkeeper._tell`` (user attrs + Optuna's tell). Replacing ``_tell``
    kills the controller exactly between the ledger's final record and the tell: the trial has a results.json
    and a final ledger record but is still RUNNING in the Optuna storage, which the next start must recover
    from its results.json (told what it measured, not crashed, not run again)."""
    from allocsearch.search.bookkeeping import Bookkeeper

    tell = Bookkeeper._tell

    def _tell(self, n: int, state: str, attrs: dict) -> None:
        if n == number:
            os.kill(os.getpid(), signal.SIGKILL)
        tell(self, n, state, attrs)

    Bookkeeper._tell = _tell
