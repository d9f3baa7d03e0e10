"""Ray Tune's BOHB as a peer (``ray:bohb``): the scheduler ``HyperBandForBOHB`` over the searcher ``TuneBOHB``
(hpbandster's BOHB config generator: a kernel density model per budget), the pair Ray's docs pair, built as
their example builds them: ``time_attr="training_iteration"`` (a trial's reports: one per recorded
checkpoint, then its end), ``max_t`` = a full trial's reports, ``reduction_factor=4`` (the ASHA peer's 4).

This scheduler *pauses* trials: a trial that reaches its bracket's milestone gives up its slot and waits, as
a Tune trial saved to an in-memory checkpoint, until the bracket's successive halving decides: the better
``1/4`` are resumed from where they paused (the device-seconds between their checkpoints, no restore cost
charged), the rest stopped. Tune's controller is played by ``_Controller``: the slice of ``TuneController``
the scheduler calls (``get_trials``, ``stop_trial`` as Tune's, ``search_alg.searcher``); which trial runs
next is the scheduler's ``choose_trial_to_run`` over Tune's trials (one pending trial from the searcher at a
time, as Tune creates them). ``TuneBOHB`` caps its running trials at the replay's concurrency (Tune's
``set_max_concurrency``); paused trials do not count. The search space: the table's configurations as a
``ConfigSpace`` (``peer_smac.config_space``). hpbandster draws from numpy's global generator: each replay
keeps its own (seeded) and restores the caller's around every call, so a replay is a function of its seed.
It exports what ``ResultGrid.get_best_result(scope="last")`` would: the highest last result, paused trials
included.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from allocsearch.bench.peer_smac import config_space, native_params
from allocsearch.bench.peer_agent import PAUSE, NumpyGlobal, Resume
from allocsearch.study.confidence import config_key

METRIC = "objective"
PENDING, RUNNING, PAUSED, TERMINATED, ERROR = "PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR"


@dataclass(eq=False)  # hashed by identity, as the scheduler keys its brackets by Tune's Trial objects
class _Trial:
    """What Tune's scheduler reads of a trial (the names of ``ray.tune.experiment.Trial``)."""
    trial_id: str
    config: dict
    status: str = PENDING
    is_saving: bool = False
    last_result: dict | None = None
    iterations: int = 0


class _Controller:
    """The part of Tune's ``TuneController`` that ``HyperBandForBOHB`` calls back."""

    def __init__(self, agent: "BohbAgent"):
        self.agent = agent
        self.search_alg = agent  # the scheduler reaches ``tune_controller.search_alg.searcher``

    def get_trials(self) -> list[_Trial]:
        return self.agent.trials

    def stop_trial(self, trial: _Trial) -> None:
        """``TuneController.stop_trial``: a pending or paused trial is removed from the scheduler and completed
        without a result for the searcher; a running one completes with its last result."""
        if trial.status in (ERROR, TERMINATED):
            return
        with self.agent.rng():
            if trial.status in (PENDING, PAUSED):
                self.agent.scheduler.on_trial_remove(self, trial)
                self.agent.searcher.on_trial_complete(trial.trial_id)
            else:
                self.agent.scheduler.on_trial_complete(self, trial, trial.last_result or {})
                self.agent.searcher.on_trial_complete(trial.trial_id, result=trial.last_result)
        trial.status = TERMINATED


@dataclass
class BohbAgent:
    plan: dict
    space: object
    layers: int
    table: object
    seed: int
    slots: int = 1
    trials: list = field(default_factory=list)
    last: dict = field(default_factory=dict)  # trial id -> its last result (get_best_result(scope="last"))

    def __post_init__(self):
        from ray.tune.schedulers import HyperBandForBOHB, TrialScheduler
        from ray.tune.search.bohb import TuneBOHB

        self.decisions = {TrialScheduler.CONTINUE: True, TrialScheduler.PAUSE: PAUSE, TrialScheduler.STOP: False}
        self._stop, self._pause = TrialScheduler.STOP, TrialScheduler.PAUSE
        self.rng = NumpyGlobal(self.seed)  # hpbandster's draws; its log ("sampled vector ... has EI value inf"
        # with the KDEs' data) is silenced below
        cs, self.values = config_space([next(iter(by.values())).params for by in self.table.runs.values()],
                                       self.seed)
        reports = max(len(r.checkpoints) for by in self.table.runs.values() for r in by.values()) + 1
        self.scheduler = HyperBandForBOHB(time_attr="training_iteration", metric=METRIC, mode="max", max_t=reports,
                                          reduction_factor=4)
        logging.getLogger("hpbandster").setLevel(logging.ERROR)
        with self.rng():
            self.searcher = TuneBOHB(space=cs, metric=METRIC, mode="max", seed=self.seed)
        self.searcher.set_max_concurrency(self.slots)
        self.controller = _Controller(self)

    def suggest(self, trial_id: str):
        """Tune's step: keep one pending trial from the searcher (``None`` while it is at its concurrency),
        then run what ``choose_trial_to_run`` picks: a pending trial, or a paused one to resume."""
        if not any(t.status == PENDING for t in self.trials):
            with self.rng():
                config = self.searcher.suggest(trial_id)
            if config is not None:
                trial = _Trial(trial_id, native_params(self.values, config))
                self.trials.append(trial)
                self.scheduler.on_trial_add(self.controller, trial)
        with self.rng():
            chosen = self.scheduler.choose_trial_to_run(self.controller)
        if chosen is None:
            return None
        was, chosen.status = chosen.status, RUNNING
        return Resume(chosen) if was == PAUSED else (chosen, chosen.config)

    def _result(self, trial: _Trial, step: int, value: float) -> dict:
        trial.iterations += 1
        trial.last_result = {METRIC: value, "step": step, "training_iteration": trial.iterations}
        self.last[trial.trial_id] = value
        return trial.last_result

    def report(self, trial: _Trial, step: int, value: float):
        """Tune's ``_process_trial_result``: the scheduler decides; the searcher hears the result unless the
        decision is stop. Returns True (continue), False (stop) or ``PAUSE``."""
        result = self._result(trial, step, value)
        with self.rng():
            decision = self.scheduler.on_trial_result(self.controller, trial, result)
            if decision != self._stop:
                self.searcher.on_trial_result(trial.trial_id, result)
        if decision == self._pause:
            trial.status = PAUSED
        return self.decisions[decision]

    def complete(self, trial: _Trial, step: int, value: float) -> None:
        """The trainable's last report (its end), then Tune completes it."""
        if trial.status == RUNNING:
            self.report(trial, step, value)
        trial.status = RUNNING  # a last report that paused it: the trainable has returned, it completes
        self.stopped(trial, step, value)

    def stopped(self, trial: _Trial, step: int, value: float) -> None:
        self.controller.stop_trial(trial)

    def cut(self, trial: _Trial, step: int | None, value: float | None) -> None:
        trial.status = TERMINATED  # the experiment's time budget: nothing more is decided

    def fail(self, trial: _Trial) -> None:  # the trainable raised (a draw that trains nothing)
        with self.rng():
            self.scheduler.on_trial_error(self.controller, trial)
            self.searcher.on_trial_complete(trial.trial_id, None, error=True)
        trial.status = ERROR

    def best(self) -> str | None:
        if not self.last:
            return None
        trial_id = max(self.last, key=lambda i: self.last[i])
        return config_key(next(t.config for t in self.trials if t.trial_id == trial_id))


__all__ = ["BohbAgent"]
