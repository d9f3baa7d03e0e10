"""One record of a trial, as every reader sees it: the live view, MLflow, ``status``, the dashboard,
``export`` and the replay all read :class:`TrialRecord` rows built here from Optuna's (and the study's one
best from them: ``confidence.best_of``). Torch-, Optuna- and Ray-free.

A trial's state, with its Optuna form (:func:`state_of` reads it, :func:`optuna_state` writes it):

    completed   ran to its end and its final evaluation          Optuna COMPLETE (its value)
    pruned      stopped early: ASHA, its budget cap, the user    Optuna PRUNED (value = last checkpoint)
    oom         ran out of device memory: the configuration does Optuna PRUNED, infeasible (no crash:
                not fit; samplers learn to avoid it              not counted toward --max-failures)
    failed      it failed (NaN, an exception, its worker died)   Optuna FAIL
    crashed     the controller died while it ran                 Optuna FAIL (retried once on resume)
    not_run     sampled, never started                           Optuna FAIL
    running / queued                                             Optuna RUNNING / WAITING

What the controller stores on an Optuna trial beyond its params and values are user attributes named in
:class:`Attr`; nothing else spells those keys.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from typing import Any, Iterable


def config_key(params: dict) -> str:
    """One configuration's identity: its parameters, canonical JSON."""
    return json.dumps(params, sort_keys=True, default=str)


class State:
    """A trial's state (plain strings: they are what ``status --json`` and the dashboard show)."""

    COMPLETED, PRUNED, OOM, FAILED = "completed", "pruned", "oom", "failed"
    CRASHED, NOT_RUN, RUNNING, QUEUED = "crashed", "not_run", "running", "queued"
    ALL = (COMPLETED, PRUNED, OOM, FAILED, CRASHED, NOT_RUN, RUNNING, QUEUED)
    ENDED_BADLY = (OOM, FAILED, CRASHED)  # a sign something is wrong (--max-failures counts failed ones)
    LIVE = (RUNNING, QUEUED)  # not ended yet
    WITH_RESULT = (COMPLETED, PRUNED)  # measured something: export-able, plotted


class Attr:
    """The user attributes of a study's Optuna trials."""

    STATE = "state"  # refines Optuna's state (oom, crashed, not_run)
    SEED = "seed"  # the training seed this run used
    CONFIRM = "confirm"  # a confirmation run: the first trial of the configuration it re-runs
    RETRY_OF = "retry_of"  # a re-run of a trial that crashed, or ran out of memory
    OOM_RETRY = "oom_retry"  # the smaller batch an out-of-memory retry runs with
    PRIOR = "prior"  # the paper setting a prior trial runs
    SUMMARY = "summary"  # one line naming the configuration
    EXPERTS = "experts"  # experts per layer
    PREDICTED = "predicted_cost"  # the cost model's prediction at admission (budget units)
    CAP = "cap"  # the budget cap it was admitted with
    FEATURES = "features"  # what the cost model predicted it from
    SESSION = "session"  # the controller session that ran it
    CHECKPOINT_SECONDS = "checkpoint_seconds"  # {step: device-seconds to that checkpoint}
    STEPS = "steps"
    TRAINABLE = "trainable_params"
    OBJECTIVE = "objective"  # the last measured objective of a trial that did not complete
    FAILURE = "failure"
    STOP_REASON = "stop_reason"
    INFEASIBLE = "infeasible"  # 1.0: out of memory (the samplers' constraint)
    DEVICE_SECONDS = "device_seconds"  # its spend, as the ledger charged it
    WALL_SECONDS = "wall_seconds"
    TRAIN_SECONDS = "train_seconds"
    RECOVERED = "recovered"  # told what its results.json measured after a controller crash


# the ``failure`` of a draw that freezes every layer: not run, not a point of a grid (nothing to train)
NOTHING_TO_TRAIN = "every layer group drew 0 experts or rank 0: nothing to train"


# our state -> Optuna's TrialState name
_TO_OPTUNA = {State.COMPLETED: "COMPLETE", State.PRUNED: "PRUNED", State.OOM: "PRUNED", State.FAILED: "FAIL",
              State.CRASHED: "FAIL", State.NOT_RUN: "FAIL", State.RUNNING: "RUNNING", State.QUEUED: "WAITING"}
_FROM_OPTUNA = {"COMPLETE": State.COMPLETED, "PRUNED": State.PRUNED, "FAIL": State.FAILED,
                "RUNNING": State.RUNNING, "WAITING": State.QUEUED}


def optuna_state(state: str) -> str:
    """The name of the Optuna ``TrialState`` a trial in ``state`` is stored with."""
    return _TO_OPTUNA[state]


def state_of(trial) -> tuple[str, str | None]:
    """(state, reason) of an Optuna ``FrozenTrial``: Optuna's state, refined by the recorded one."""
    attrs, name = trial.user_attrs, trial.state.name
    state = _FROM_OPTUNA.get(name, name.lower())
    recorded = attrs.get(Attr.STATE)
    if recorded != state and recorded in _TO_OPTUNA and _TO_OPTUNA[recorded] == name:
        state = recorded
    if state == State.PRUNED:
        return state, attrs.get(Attr.STOP_REASON) or "scheduler"
    return state, attrs.get(Attr.FAILURE) or attrs.get(Attr.STOP_REASON)


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a study: what it is, what it measured and what it cost."""

    number: int
    state: str
    objective: float | None  # the first objective: its final value, or the last checkpoint it reached
    params: dict = field(default_factory=dict)  # the sampled parameters: the configuration
    values: list | None = None  # every objective, once completed
    seed: int = 0
    confirm_of: int | None = None  # a confirmation run: the configuration's first trial
    retry_of: int | None = None
    prior: str | None = None
    summary: str = ""
    reason: str | None = None  # why it stopped or failed
    spend: float = 0.0  # budget units, as the ledger charged it
    predicted: float | None = None
    steps: int | None = None
    trainable_params: int | None = None
    train_seconds: float | None = None  # its training steps' time, evaluations left out
    experts: list | None = None
    intermediate: dict = field(default_factory=dict)  # {step: checkpoint objective}
    start: str | None = None  # ISO times
    end: str | None = None

    @classmethod
    def of(cls, trial, spend: float = 0.0) -> TrialRecord:
        """The record of an Optuna ``FrozenTrial``; ``spend`` from the study's ledger."""
        a = trial.user_attrs
        state, reason = state_of(trial)
        return cls(number=trial.number, state=state, reason=reason, params=dict(trial.params),
                   objective=trial.values[0] if trial.values else a.get(Attr.OBJECTIVE),
                   values=list(trial.values) if trial.values else None, seed=a.get(Attr.SEED, 0),
                   confirm_of=a.get(Attr.CONFIRM), retry_of=a.get(Attr.RETRY_OF), prior=a.get(Attr.PRIOR),
                   summary=a.get(Attr.SUMMARY, ""), spend=spend, predicted=a.get(Attr.PREDICTED),
                   steps=a.get(Attr.STEPS), trainable_params=a.get(Attr.TRAINABLE),
                   train_seconds=a.get(Attr.TRAIN_SECONDS), experts=a.get(Attr.EXPERTS),
                   intermediate=dict(trial.intermediate_values),
                   start=trial.datetime_start.isoformat() if trial.datetime_start else None,
                   end=trial.datetime_complete.isoformat() if trial.datetime_complete else None)

    @property
    def completed(self) -> bool:
        return self.state == State.COMPLETED and self.objective is not None

    @functools.cached_property
    def key(self) -> str:
        """Its configuration's ``config_key``, made once: the controller's reads group thousands of records by
        it at every trial's end (the controller keeps finished trials' records, ``TrialStore.records``)."""
        return config_key(self.params)

    def to_dict(self) -> dict[str, Any]:
        """Its fields, containers copied one level (``dataclasses.asdict`` deep-copies: 1 s of ``status`` on a
        study of 5,000 trials, ``allocsearch bench scale``)."""
        return {f.name: _shallow(getattr(self, f.name)) for f in fields(self)}


def _shallow(value):
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def records_of(trials: Iterable, spend: dict[int, float] | None = None) -> list[TrialRecord]:
    """Records of Optuna ``FrozenTrial`` s; ``spend``: the ledger's device-seconds per trial number."""
    spend = spend or {}
    return [TrialRecord.of(t, spend.get(t.number, 0.0)) for t in trials]


__all__ = ["NOTHING_TO_TRAIN", "Attr", "State", "TrialRecord", "config_key", "optuna_state", "records_of", "state_of"]
