"""Optuna bookkeeping: what the study's storage is told when a trial reports, ends, or was left behind by a
dead controller. Admission (budget keeper, cost model) lives in the controller; Ray in the executor.

A trial's end is decided once (:func:`decide`) from the result that ended it, whether that result arrives
live through Ray or is read back from results.json after a crash, and recorded in one order:

    results.json (if the worker could not write it) -> the ledger's final record -> user attrs + tell

so a kill between any two steps is recovered from the step before it (:meth:`Bookkeeper.recover`): a
trial whose results.json says it ended is told what it measured; one without is marked crashed and its
configuration retried once. States and their Optuna forms: ``allocsearch.study.records``.
"""
from __future__ import annotations

import json
import os

from allocsearch.search.report import TrialReport
from allocsearch.search.samplers import record_feasibility
from allocsearch.study.folder import CRASHED, NOT_STARTED, Study, metric_names

KILL_BEFORE_TELL = "ALLOCSEARCH_TEST_KILL_BEFORE_TELL"  # test hook: a trial number; kill -9 before its tell
NO_RESULT = "the trial's worker ended without a result"
_OPTUNA_STATE = {"completed": "COMPLETE", "pruned": "PRUNED", "oom": "PRUNED", "failed": "FAIL"}


def is_out_of_memory(reason: str | None) -> bool:
    """A failure that says the device ran out of memory (CUDA, MPS, the CPU allocator, Ray's memory monitor)."""
    text = (reason or "").lower()  # not "OOM killer": Ray names it as a possible cause of any killed worker
    return any(sign in text for sign in ("out of memory", "outofmemory", "can't allocate memory"))


def decide(last: TrialReport | None, *, error: bool, failure: str | None, user_stop: bool) -> tuple[str, dict]:
    """(state, attrs) of a trial's end from ``last``, the report that ended it: its final report, or the
    checkpoint a scheduler / stop acted on, or None (nothing came back)."""
    attrs = {"steps": last.step if last else 0, "trainable_params": last.trainable_params if last else None}
    failure = (last.failure if last else None) or failure
    if error or failure or last is None:
        attrs["failure"] = failure or NO_RESULT
        if not is_out_of_memory(attrs["failure"]):
            return "failed", attrs
        # the configuration does not fit the device: not a crash, and infeasible for the sampler
        state, attrs["infeasible"] = "oom", 1.0
    elif last.final and last.status == "completed":
        state = "completed"
    else:
        state = "pruned"
        attrs["stop_reason"] = last.payload.get("stop_reason") or ("user" if user_stop else "scheduler")
    if last is not None and last.objective is not None:
        attrs["objective"] = float(last.objective)
    train_seconds = last.payload.get("train_seconds") or last.train_seconds if last else None
    if train_seconds:
        attrs["train_seconds"] = float(train_seconds)
    return state, attrs


class Bookkeeper:
    """Tells the study's Optuna storage what happened, by trial number."""

    def __init__(self, study: Study, ostudy):
        self.study, self.ostudy = study, ostudy
        self.single = len(study.objectives) == 1

    def report(self, number: int, step: int, value: float) -> None:
        """A checkpoint's validation score -> the trial's intermediate value at ``step`` (single objective)."""
        if self.single:
            trial_id = self.ostudy._storage.get_trial_id_from_study_id_trial_number(self.ostudy._study_id, number)
            self.ostudy._storage.set_trial_intermediate_value(trial_id, int(step), float(value))

    def end(self, number: int, last: TrialReport | None, *, error: bool = False, failure: str | None = None,
            user_stop: bool = False, wall: float, devices: float, session: int) -> tuple[str, dict, dict]:
        """Record a trial's end (see the module's order); returns (state, attrs, its results payload)."""
        state, attrs = decide(last, error=error, failure=failure, user_stop=user_stop)
        payload = last.payload if last else {}
        if payload and self.study.read_result(number) is None:  # the worker could not write it here
            from allocsearch.fileio import write_text_atomic

            write_text_atomic(self.study.trial_dir(number) / "results.json", json.dumps(payload, indent=2))
        self.study.ledger.record_trial(number, wall, devices, final=True, session=session)
        if os.environ.get(KILL_BEFORE_TELL) == str(number):  # scripts/kill_resume.py: die right here
            os.kill(os.getpid(), 9)
        attrs.update(state=state, device_seconds=wall * devices, wall_seconds=wall)
        self._tell(number, state, attrs)
        return state, attrs, payload

    def _tell(self, number: int, state: str, attrs: dict) -> None:
        from optuna.trial import TrialState

        storage = self.ostudy._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.ostudy._study_id, number)
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        record_feasibility(storage, trial_id, attrs.get("infeasible", 0.0))
        values = None
        if state == "completed":  # the objectives as measured; device_seconds as the ledger charged it
            values = [float(attrs[m]) for m in metric_names(self.study.objectives)]
        self.ostudy.tell(number, values, state=TrialState[_OPTUNA_STATE[state]])

    def rows(self) -> list[dict]:
        """The study's trials as ``allocsearch.study.confidence`` and the confirmation phase read them."""
        from allocsearch.study.records import state_of

        return [{"number": t.number, "state": state_of(t)[0], "params": t.params, "seed": t.user_attrs.get("seed", 0),
                 "objective": t.values[0] if t.values else t.user_attrs.get("objective"),
                 "confirm": t.user_attrs.get("confirm")} for t in self.ostudy.get_trials(deepcopy=False)]

    def rung_history(self) -> list[tuple[int, dict, float | None]]:
        """Each trial a rung could have judged (no confirmation run): (number, {step: checkpoint}, final
        score if it completed), for a resumed search's rungs (``Rungs.restore``)."""
        from optuna.trial import TrialState

        return [(t.number, dict(t.intermediate_values), t.values[0] if t.state == TrialState.COMPLETE and t.values
                 else None) for t in self.ostudy.get_trials(deepcopy=False)
                if t.intermediate_values and t.user_attrs.get("confirm") is None]

    def reserve_left(self, reserve: float) -> float:
        """What is left of the confirmation phase's ``reserve`` after the confirmation runs so far."""
        if not reserve:
            return 0.0
        spent = self.study.ledger.trial_spend()
        used = sum(spent.get(t.number, 0.0) for t in self.ostudy.get_trials(deepcopy=False)
                   if t.user_attrs.get("confirm") is not None)
        return max(0.0, reserve - used)

    def not_run(self, number: int, reason: str) -> None:
        from optuna.trial import TrialState

        trial_id = self.ostudy._storage.get_trial_id_from_study_id_trial_number(self.ostudy._study_id, number)
        self.ostudy._storage.set_trial_user_attr(trial_id, "state", "not_run")
        self.ostudy._storage.set_trial_user_attr(trial_id, "failure", reason)
        self.ostudy.tell(number, None, state=TrialState.FAIL)

    def recover(self) -> dict[str, list[int]]:
        """Trials left RUNNING by a dead controller. One whose results.json says it ended is told what it
        measured (nothing that ended is lost or run again); the others -> FAIL with the reason, their
        configurations enqueued again (once for trials that ran; always for trials never started)."""
        from optuna.trial import TrialState

        spent = self.study.ledger.trial_spend()
        retried = {t.user_attrs.get("retry_of") for t in self.ostudy.get_trials(deepcopy=False)}
        out: dict[str, list[int]] = {"crashed": [], "not_started": [], "retried": [], "recovered": []}
        storage = self.ostudy._storage
        for t in self.ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            result = self.study.read_result(t.number)
            if result and result.get("status") in ("completed", "stopped", "failed"):
                for c in result.get("checkpoints") or []:  # the curve, as the live run would have reported it
                    if c.get("step") not in t.intermediate_values:
                        self.report(t.number, c["step"], c["metrics"]["macro_balanced_accuracy"])
                state, attrs = decide(TrialReport.from_result(result), error=False, failure=None, user_stop=False)
                spend = spent.get(t.number, 0.0)
                attrs.update(state=state, device_seconds=spend, recovered=True,
                             wall_seconds=float(result.get("wall_seconds") or 0.0))
                self._tell(t.number, state, attrs)
                out["recovered"].append(t.number)
                continue
            started = t.number in spent
            storage.set_trial_user_attr(t._trial_id, "failure", CRASHED if started else NOT_STARTED)
            storage.set_trial_user_attr(t._trial_id, "state", "crashed" if started else "not_run")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            out["crashed" if started else "not_started"].append(t.number)
            if not t.params:
                continue
            if not started:
                attrs = {k: v for k, v in t.user_attrs.items() if k in ("retry_of", "prior")}
                self.ostudy.enqueue_trial(t.params, user_attrs=attrs)
            elif "retry_of" not in t.user_attrs and t.number not in retried:
                self.ostudy.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                out["retried"].append(t.number)
        return out
