"""What a peer is to the replay's loop (``allocsearch.bench.peers``): an *agent* wrapping the peer's own
objects, asked and told as the peer's users' loop asks and tells them.

    suggest(trial_id) -> (handle, params) | Resume(handle) | None   a new trial, a paused one to run on, nothing now
    report(handle, step, value) -> True | False | PAUSE             a checkpoint: continue, stop, or pause it
    complete(handle, step, value)                                   it ran to its end
    stopped(handle, step, value)                                    it was stopped (its scheduler, a rung)
    cut(handle, step | None, value | None)                          the budget ran out while it ran
    fail(handle)                                                    a draw that trains nothing (not a trial)
    best() -> configuration key | None                              what the peer would export now
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

PAUSE = "PAUSE"  # ``report``'s answer for a trial its scheduler paused: its slot and spend stop until resumed


@dataclass
class Resume:
    """``suggest``'s answer when the peer's scheduler picks a paused trial: it runs on from its last checkpoint."""
    handle: object


class NumpyGlobal:
    """numpy's global generator for one replay, for peers that draw from it (hpbandster's BOHB, Syne Tune's
    bracket choice and searchers): ``with rng():`` (an instance) around every call into the peer puts this replay's
    (seeded) state in and the caller's back after, so a replay is a function of its seed and leaves the
    caller's draws alone. Its numerical warnings (a density or a classifier fitted on a few points) stay off
    the user's terminal."""

    def __init__(self, seed: int):
        import numpy as np

        self._state = np.random.RandomState(seed).get_state()

    @contextlib.contextmanager
    def __call__(self):
        import numpy as np

        caller = np.random.get_state()
        np.random.set_state(self._state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.simplefilter("ignore", FutureWarning)
                yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(caller)


__all__ = ["PAUSE", "NumpyGlobal", "Resume"]
