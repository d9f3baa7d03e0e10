"""Syne Tune as a peer (``syne:asha``, ``syne:bohb``, ``syne:asha-bore``): its schedulers from
``syne_tune.optimizer.baselines`` (0.16), driven as its ``Tuner`` drives them.

- ``syne:asha``: ``ASHA`` (asynchronous successive halving, random search; reduction factor 3, its default).
- ``syne:bohb``: ``BOHB``: the same rungs, new configurations from a kernel density model of the trials' last
  results (Syne Tune's asynchronous BOHB). The model is fitted once its good part (the top 15%, at least as
  many points as the space has parameters) and the rest each hold more points than the space has
  parameters: about 7x that many trials; until then its draws are random (on tables of 7-33
  configurations, within half the grid, it is ``syne:asha``).
- ``syne:asha-bore``: ``ASHABORE``: the same rungs, configurations from BORE (a classifier of good against bad,
  xgboost's by default).

Syne Tune 0.16 ships no DEHB, MOBSTER or HyperTune (they left its baselines with 0.15; 0.14 still had them,
but requires numpy < 1.27, which this project's torch cannot share).

The schedulers' fidelity is the training step (``time_attr="step"``, ``max_t`` = a trial's steps,
``grace_period`` = the first checkpoint), as the Ray ASHA peer's. The loop is the replay's own clock
(``allocsearch.bench.peers``), not Syne Tune's simulator backend, so every strategy runs on the same clock,
budget and concurrency; what reaches the scheduler is what its ``Tuner`` sends (``Tuner._update_running_trials``):

    a new trial         suggest(), then on_trial_add(trial)
    a checkpoint        on_trial_result(trial, result) -> CONTINUE / STOP; on STOP, on_trial_remove(trial)
    the trial's end     on_trial_result with the last result; unless that stopped it, on_trial_complete
    a failure           on_trial_error(trial)

The search space: Syne Tune's spaces are flat (no conditions), so each parameter the table's configurations
hold is a ``choice`` over its values, and a drawn configuration is read through the table's own define-by-run
space (a ``FixedTrial`` of the draw): the parameters of the method not drawn are drawn and ignored, as a flat
space's user does. The scheduler is told the whole draw. It exports what
``ExperimentResult.best_config()`` would: the configuration of the highest result any trial reported (rows of
its results, intermediate ones included; the first on a tie). Syne Tune draws its bracket and some searchers'
candidates from numpy's global generator: ``NumpyGlobal`` keeps each replay's own.
"""
from __future__ import annotations

import contextlib
import datetime
import logging

from allocsearch.bench.peer_agent import NumpyGlobal
from allocsearch.bench.peer_smac import native_params, table_values
from allocsearch.study.confidence import config_key

METRIC = "objective"
SCHEDULERS = {"asha": "ASHA", "bohb": "BOHB", "asha-bore": "ASHABORE"}  # syne:<name> -> baselines.<class>


class SyneAgent:
    def __init__(self, plan: dict, space, layers: int, table, seed: int):
        from syne_tune.config_space import choice
        from syne_tune.optimizer import baselines
        from syne_tune.optimizer.scheduler import SchedulerDecision

        first, steps = table.fidelity()
        self.values = table_values([next(iter(by.values())).params for by in table.runs.values()])
        self.numpy = NumpyGlobal(seed)
        with self.rng():
            self.scheduler = getattr(baselines, SCHEDULERS[plan["scheduler"]])(
                config_space={k: choice(v) for k, v in self.values.items()}, metric=METRIC, do_minimize=False,
                time_attr="step", max_t=steps, grace_period=first, random_seed=seed)
        self.stop = SchedulerDecision.STOP
        self.space, self.layers = space, layers
        self.keys: dict[int, str] = {}
        self.top: tuple[float, str] | None = None  # the highest result reported, and its trial's configuration
        self.trials = 0

    @contextlib.contextmanager
    def rng(self):
        """A call into Syne Tune: numpy's global generator holds this replay's state (``NumpyGlobal``), and its
        log stays off the terminal ("trial_id 3: Evaluation failed!" per draw that trains nothing; BORE's
        "Tried 10000 times to sample a new configuration", on the root logger, at every ask once the space holds
        fewer configurations than its 500 candidates)."""
        previous = logging.root.manager.disable
        logging.disable(logging.ERROR)
        try:
            with self.numpy():
                yield
        finally:
            logging.disable(previous)

    def suggest(self, trial_id: str):
        import optuna
        from syne_tune.backend.trial_status import Trial

        with self.rng():
            suggestion = self.scheduler.suggest()
        if suggestion is None:  # its searcher ran out of configurations
            return None
        trial = Trial(trial_id=self.trials, config=suggestion.config, creation_time=datetime.datetime.now())
        self.trials += 1
        with self.rng():
            self.scheduler.on_trial_add(trial=trial)
        params = self.space.sample(optuna.trial.FixedTrial(native_params(self.values, trial.config)), self.layers)
        self.keys[trial.trial_id] = config_key(params)
        return trial, params

    def report(self, trial, step: int, value: float) -> bool:
        if self.top is None or value > self.top[0]:
            self.top = (value, self.keys[trial.trial_id])
        with self.rng():
            decision = self.scheduler.on_trial_result(trial=trial, result={METRIC: value, "step": step})
            if decision == self.stop:
                self.scheduler.on_trial_remove(trial=trial)
        return decision != self.stop

    def complete(self, trial, step: int, value: float) -> None:
        if self.report(trial, step, value):  # at max_t ASHA stops it (removed); otherwise the Tuner completes it
            with self.rng():
                self.scheduler.on_trial_complete(trial=trial, result={METRIC: value, "step": step})

    def stopped(self, trial, step: int, value: float) -> None:
        pass  # its scheduler stopped it at a rung: removed in ``report``

    def cut(self, trial, step: int | None, value: float | None) -> None:
        pass  # the tuning time ran out: the Tuner's ``trial_backend.stop_all()``; the scheduler is not told

    def fail(self, trial) -> None:
        with self.rng():
            self.scheduler.on_trial_error(trial=trial)

    def best(self) -> str | None:
        return self.top[1] if self.top else None


__all__ = ["SCHEDULERS", "SyneAgent"]
