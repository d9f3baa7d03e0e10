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

from allocsearch.fileio import write_text_atomic
from allocsearch.search.report import TrialReport
from allocsearch.search.samplers import record_feasibility
from allocsearch.study.folder import CRASHED, NOT_STARTED, Files, Study, metric_names
from allocsearch.study.ledger import device_seconds
from allocsearch.study.records import Attr, State, TrialRecord
from allocsearch.study.storage import TrialStore
from allocsearch.training.config import TrainConfig
from allocsearch.training.scoring import OBJECTIVE_METRIC

NO_RESULT = "the trial's worker ended without a result"


def is_out_of_memory(reason: str | None) -> bool:
    """A failure that says the device ran out of memory (CUDA, MPS, the CPU allocator, Ray's memory monitor)."""
    text = (reason or "").lower()  # not "OOM killer": Ray names it as a possible cause of any killed worker
    return any(sign in text for sign in ("out of memory", "outofmemory", "can't allocate memory"))


def decide(last: TrialReport | None, *, error: bool, failure: str | None, user_stop: bool) -> tuple[str, dict]:
    """(state, attrs) of a trial's end from ``last``, the report that ended it: its final report, or the
    checkpoint a scheduler / stop acted on, or None (nothing came back)."""
    attrs = {Attr.STEPS: last.step if last else 0, Attr.TRAINABLE: last.trainable_params if last else None}
    failure = (last.failure if last else None) or failure
    if error or failure or last is None:
        attrs[Attr.FAILURE] = failure or NO_RESULT
        if not is_out_of_memory(attrs[Attr.FAILURE]):
            return State.FAILED, attrs
        # the configuration does not fit the device: not a crash, and infeasible for the sampler
        state, attrs[Attr.INFEASIBLE] = State.OOM, 1.0
    elif last.final and last.status == "completed":
        state = State.COMPLETED
    else:
        state = State.PRUNED
        attrs[Attr.STOP_REASON] = last.payload.get("stop_reason") or ("user" if user_stop else "scheduler")
    if last is not None and last.objective is not None:
        attrs[Attr.OBJECTIVE] = float(last.objective)
    train_seconds = last.payload.get("train_seconds") or last.train_seconds if last else None
    if train_seconds:
        attrs[Attr.TRAIN_SECONDS] = float(train_seconds)
    return state, attrs


class Bookkeeper:
    """Tells the study's Optuna storage (its ``TrialStore``) what happened, by trial number."""

    def __init__(self, study: Study, store: TrialStore):
        self.study, self.store = study, store
        self.single = len(study.objectives) == 1

    def report(self, number: int, step: int, value: float) -> None:
        """A checkpoint's validation score -> the trial's intermediate value at ``step`` (single objective)."""
        if self.single:
            self.store.report(number, step, value)

    def end(self, number: int, last: TrialReport | None, *, error: bool = False, failure: str | None = None,
            user_stop: bool = False, wall: float, devices: float, session: int) -> tuple[str, dict, dict]:
        """Record a trial's end (see the module's order); returns (state, attrs, its results payload)."""
        state, attrs = decide(last, error=error, failure=failure, user_stop=user_stop)
        payload = last.payload if last else {}
        if payload and self.study.read_result(number) is None:  # the worker could not write it here
            write_text_atomic(self.study.trial_dir(number) / Files.RESULTS, json.dumps(payload, indent=2))
        self.study.ledger.record_trial(number, wall, devices, final=True, session=session)
        attrs.update({Attr.STATE: state, Attr.DEVICE_SECONDS: device_seconds(wall, devices), Attr.WALL_SECONDS: wall})
        self._tell(number, state, attrs)
        return state, attrs, payload

    def _tell(self, number: int, state: str, attrs: dict) -> None:
        self.store.set_attrs(number, attrs)
        record_feasibility(self.store, number, attrs.get(Attr.INFEASIBLE, 0.0))
        values = None
        if state == State.COMPLETED:  # the objectives as measured; device_seconds as the ledger charged it
            values = [float(attrs[m]) for m in metric_names(self.study.objectives)]
        self.store.tell(number, state, values)

    def records(self) -> list[TrialRecord]:
        """The study's trials (``allocsearch.study.confidence`` and the confirmation phase read them)."""
        return self.store.records()

    def cost_observations(self) -> list[tuple[dict, float, int, float, bool]]:
        """What the cost model learns from the trials that ran (a resumed study's): (features, wall seconds,
        steps, training seconds, whether it ran its final evaluation)."""
        out = []
        for t in self.store.trials():
            a = t.user_attrs
            if Attr.TRAIN_SECONDS in a and a.get(Attr.STEPS, 0) > 0:
                out.append((a[Attr.FEATURES], a[Attr.WALL_SECONDS], a[Attr.STEPS], a[Attr.TRAIN_SECONDS],
                            a.get(Attr.STATE) == State.COMPLETED))
        return out

    def rung_history(self) -> list[tuple[int, dict, float | None]]:
        """Each trial a rung could have judged (no confirmation run): (number, {step: checkpoint}, final
        score if it completed), for a resumed search's rungs (``Rungs.restore``)."""
        return [(r.number, r.intermediate, r.objective if r.state == State.COMPLETED else None)
                for r in self.records() if r.intermediate and r.confirm_of is None]

    def reserve_left(self, reserve: float) -> float:
        """What is left of the confirmation phase's ``reserve`` after the confirmation runs so far."""
        if not reserve:
            return 0.0
        spent = self.study.ledger.trial_spend()
        used = sum(spent.get(r.number, 0.0) for r in self.records() if r.confirm_of is not None)
        return max(0.0, reserve - used)

    def retry_smaller(self, number: int, params: dict, train: dict, attrs: dict) -> dict | None:
        """An out-of-memory trial runs once more with half the batch and twice the gradient accumulation
        (the same examples per optimizer step, so the same configuration), unless it was that retry; returns
        the retry's training settings (None: no retry)."""
        batch, accum = int(train.get("batch_size", TrainConfig.batch_size)), int(train.get("grad_accum", 1))
        if attrs.get(Attr.OOM_RETRY) or batch < 2:
            return None
        retry = {"batch_size": batch // 2, "grad_accum": accum * 2}
        self.store.enqueue(params, {Attr.RETRY_OF: number, Attr.OOM_RETRY: retry})
        return retry

    def not_run(self, number: int, reason: str, *, infeasible: bool = False) -> None:
        """A trial that never runs; ``infeasible``: its configuration cannot run at all (the samplers learn
        to avoid it, as an out-of-memory one)."""
        attrs = {Attr.STATE: State.NOT_RUN, Attr.FAILURE: reason, **({Attr.INFEASIBLE: 1.0} if infeasible else {})}
        self.store.set_attrs(number, attrs)
        if infeasible:
            record_feasibility(self.store, number, 1.0)
        self.store.tell(number, State.NOT_RUN)

    def recover(self) -> dict[str, list[int]]:
        """Trials left RUNNING by a dead controller. One whose results.json says it ended is told what it
        measured (nothing that ended is lost or run again); the others -> FAIL with the reason, their
        configurations enqueued again (once for trials that ran; always for trials never started)."""
        from optuna.trial import TrialState

        spent = self.study.ledger.trial_spend()
        retried = {t.user_attrs.get(Attr.RETRY_OF) for t in self.store.trials()}
        out: dict[str, list[int]] = {"crashed": [], "not_started": [], "retried": [], "recovered": []}
        for t in self.store.trials(states=(TrialState.RUNNING,)):
            result = self.study.read_result(t.number)
            if result and result.get("status") in ("completed", "stopped", "failed"):
                for c in result.get("checkpoints") or []:  # the curve, as the live run would have reported it
                    if c.get("step") not in t.intermediate_values:
                        self.report(t.number, c["step"], c["metrics"][OBJECTIVE_METRIC])
                state, attrs = decide(TrialReport.from_result(result), error=False, failure=None, user_stop=False)
                attrs.update({Attr.STATE: state, Attr.DEVICE_SECONDS: spent.get(t.number, 0.0), Attr.RECOVERED: True,
                              Attr.WALL_SECONDS: float(result.get("wall_seconds") or 0.0)})
                self._tell(t.number, state, attrs)
                out["recovered"].append(t.number)
                continue
            started = t.number in spent
            self.store.set_attrs(t.number, {Attr.FAILURE: CRASHED if started else NOT_STARTED,
                                            Attr.STATE: State.CRASHED if started else State.NOT_RUN})
            self.store.fail_running(t.number)
            out["crashed" if started else "not_started"].append(t.number)
            if not t.params:
                continue
            if not started:
                self.store.enqueue(t.params, {k: v for k, v in t.user_attrs.items() if k in (Attr.RETRY_OF, Attr.PRIOR)})
            elif Attr.RETRY_OF not in t.user_attrs and t.number not in retried:
                self.store.enqueue(t.params, {Attr.RETRY_OF: t.number})
                out["retried"].append(t.number)
        return out
