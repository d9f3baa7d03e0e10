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

from dataclasses import dataclass

PAUSE = "PAUSE"  # ``report``'s answer for a trial its scheduler paused: its slot and spend stop until resumed


@dataclass
class Resume:
    """``suggest``'s answer when the peer's scheduler picks a paused trial: it runs on from its last checkpoint."""
    handle: object


__all__ = ["PAUSE", "Resume"]
