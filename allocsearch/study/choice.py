"""Which configuration a study exports: THE best, one rule for every reader (the live view, MLflow, ``status``,
the dashboard, ``export`` and the replay).

    best        the confirmed winner (``confidence.winner_of``: the best mean among the configurations the
                confirmation race re-ran, else among all), scored by its mean over seeds
    cheapest    among the winner and the configurations statistically tied with it (``confidence.evidence``)
                on at least two seeds, the one with the fewest trainable parameters, then the fastest training
                step, then the best mean, when it saves at least 10% of the winner's parameters (or step time):
                what a user who serves the model wants when the search cannot tell them apart
                (``--prefer cheapest``). A single run tied by the noise alone is not evidence
                enough to deploy: with those in, the replay on the first recorded table gave up 0.024 +- 0.011
                of true quality at 50% of the grid (82% fewer parameters); with two seeds required, 0.014 +-
                0.010 (65% fewer), 20 replays each.

A study stores its preference (``Execution.prefer``); ``status`` and ``export`` may ask for the other.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from allocsearch.study.confidence import config_key, estimates, evidence, raced, winner
from allocsearch.study.records import TrialRecord

PREFER = ("best", "cheapest")
MIN_SAVING = 0.10  # what a tied configuration must save of the winner's size (or step time) to replace it


@dataclass(frozen=True)
class Best:
    """The configuration a study exports and its score: the mean over the seeds it ran on (one seed: that
    run's objective)."""

    trial: int  # the configuration's first completed trial: its folder, its MLflow run, what export writes
    value: float  # mean objective over its seeds
    n: int  # seeds it completed on
    trials: list  # every completed run of it
    params: dict
    summary: str = ""
    experts: list | None = None
    trainable_params: int | None = None
    step_seconds: float | None = None  # mean training seconds per step over its completed runs
    prefer: str = "best"  # the rule that chose it

    def label(self) -> str:
        """``0.8308 (mean of 2 seeds)`` or ``0.8354 (1 seed)``."""
        return f"{self.value:.4f} " + (f"(mean of {self.n} seeds)" if self.n > 1 else "(1 seed)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_of(records: Iterable[TrialRecord], noise: float | None = None, prefer: str = "best") -> Best | None:
    """The study's best (None before any completed trial) by the rule ``prefer`` (see the module);
    ``noise``: the study's declared seed noise, as every reader passes it."""
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {', '.join(PREFER)}, not {prefer!r}")
    records = list(records)
    ests = estimates(records)  # once: the controller calls this at every trial's end
    win = winner(ests, raced(records), noise)
    if win is None:
        return None
    key = win.key
    means = {e.key: e for e in ests}
    runs = _runs_by_key(records)
    if prefer == "cheapest":
        ev = evidence(records, noise)
        tied = [win.key] + [config_key(t["params"]) for t in ev["tied"] if t["n"] > 1]  # confirmed ties
        # fewest parameters, then the fastest step; among equals the winner, then the better mean
        key = min(tied, key=lambda k: _cost(runs.get(k, [])) + (k != win.key, -means[k].mean))
        if not _saves(_cost(runs.get(key, [])), _cost(runs.get(win.key, []))):
            key = win.key  # a few percent smaller is not worth a worse mean
    return _best(records, means[key], _cost(runs.get(key, [])), prefer)


def _best(records: list[TrialRecord], est, cost: tuple[float, float], prefer: str) -> Best:
    first = next(r for r in records if r.number == est.first_trial())
    trainable, step = cost
    return Best(trial=first.number, value=est.mean, n=est.n, trials=sorted(est.trials.values()),
                params=dict(est.params), summary=first.summary, experts=first.experts,
                trainable_params=None if trainable == float("inf") else int(trainable),
                step_seconds=None if step == float("inf") else step, prefer=prefer)


def _runs_by_key(records: list[TrialRecord]) -> dict[str, list[TrialRecord]]:
    """Completed runs by configuration (one pass: a study of thousands of trials reads this per status)."""
    out: dict[str, list[TrialRecord]] = {}
    for r in records:
        if r.completed and r.params:
            out.setdefault(r.key, []).append(r)
    return out


def _cost(runs: list[TrialRecord]) -> tuple[float, float]:
    """(trainable parameters, mean seconds per training step) of a configuration's completed runs; inf where
    unknown (never preferred for being cheap)."""
    trainable = next((r.trainable_params for r in runs if r.trainable_params), None)
    steps = [r.train_seconds / r.steps for r in runs if r.train_seconds and r.steps]
    return (float(trainable) if trainable else float("inf"),
            statistics.fmean(steps) if steps else float("inf"))


def _saves(cost: tuple[float, float], than: tuple[float, float]) -> bool:
    """Whether ``cost`` (parameters, step seconds) saves at least ``MIN_SAVING`` of ``than``: in parameters, or
    with as many parameters, in step time."""
    (params, step), (params0, step0) = cost, than
    if params < params0:
        return params <= (1 - MIN_SAVING) * params0
    return params == params0 and step <= (1 - MIN_SAVING) * step0


def configuration_score(records: Iterable[TrialRecord], number: int) -> tuple[float, int] | None:
    """(mean over seeds, seeds) of the configuration trial ``number`` ran, over its completed runs."""
    records = list(records)
    row = next((r for r in records if r.number == number), None)
    if row is None or not row.params:
        return None
    key = config_key(row.params)
    est = next((e for e in estimates(records) if e.key == key), None)
    return (est.mean, est.n) if est else None


__all__ = ["Best", "PREFER", "best_of", "configuration_score"]
