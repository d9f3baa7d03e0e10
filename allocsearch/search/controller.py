"""The search controller: the loop a reader follows top to bottom.

    open or create the study -> recover trials a dead controller left running -> enqueue paper priors
    -> Ray Tune asks for trials (``propose``): Optuna samples one, the cost model predicts it, the budget
       admits it with a cap or not -> trials report checkpoints (``on_result``: Optuna's intermediate
       values, the live view) -> a trial ends (``on_complete``: Optuna told COMPLETE / PRUNED / FAIL, the
       ledger's final record, the cost model learns) -> every loop tick (``tick``) the ledger gets a
       heartbeat of each running trial's spend, so a kill -9 loses at most a few seconds of accounting
    -> no trial fits in what is left (or the user stops, or trials keep failing) -> summary.

Ray specifics live in ``executor``; budget, storage and space in their own modules; nothing here knows the
command line: ``on_event(kind, **data)`` lets a caller show progress.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

from allocsearch.search.budget import Budget, BudgetKeeper, CostModel, devices_per_trial
from allocsearch.search.space import SearchSpace
from allocsearch.search.study import Study, directions, metric_names

HEARTBEAT_SECONDS = 2.0
CAP_SLACK_SECONDS = 2.0
UNSEEN_FACTOR = 1.6  # prediction headroom before two trials have been observed  # the worker's clock starts after the controller counts the trial as running


class Controller:
    def __init__(self, study: Study, space: SearchSpace, *, num_layers: int, sampler=None,
                 on_event: Callable[..., None] | None = None, clock: Callable[[], float] = time.monotonic):
        s = study.settings
        self.study, self.space, self.num_layers = study, space, num_layers
        self.budget = Budget.from_dict(s["budget"])
        self.devices = devices_per_trial(self.budget.unit, s["cpus_per_trial"], s["gpus_per_trial"])
        self.max_failures = int(s.get("max_failures", 5))
        self.emit = on_event or (lambda kind, **data: None)
        self.clock = clock
        self.sampler = sampler
        self.ostudy = study.load_optuna(sampler)
        self.recovered = study.recover(self.ostudy)
        if s.get("priors", True) and not s.get("priors_enqueued"):
            for label, params in space.priors(num_layers):
                self.ostudy.enqueue_trial(params, user_attrs={"prior": label}, skip_if_exists=True)
            study.check_resume({"priors_enqueued": True})
        self.session = study.ledger.next_session()
        self.session_start = clock()
        study.ledger.record_session(self.session, 0.0)
        self.keeper = BudgetKeeper(self.budget, study.ledger.spent(self.budget.unit), clock=clock)
        self.cost = self._cost_model()
        self.running: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, str] = {}
        self.pending = None  # (optuna trial, params): sampled, waiting for budget
        self.failures_in_row = 0
        self.end_reason: str | None = None
        self._last_beat = -math.inf
        self._user_stop = False
        study.clear_stop()

    # ------------------------------------------------------------------------------ set-up
    def _cost_model(self) -> CostModel:
        train = self.space.train
        model = CostModel.for_model(self.space.model, _tokens_per_step(train))
        for t in self.ostudy.get_trials(deepcopy=False):  # a resumed study: learn from what already ran
            if "train_seconds" in t.user_attrs and t.user_attrs.get("steps", 0) > 0:
                model.observe(t.user_attrs["features"], t.user_attrs["wall_seconds"], t.user_attrs["steps"],
                              t.user_attrs["train_seconds"], complete=t.user_attrs.get("state") == "completed")
        return model

    def tune_metrics(self) -> tuple[list[str], list[str]]:
        """The metric names trials report and Tune's modes, one per objective."""
        objectives = self.study.objectives
        return metric_names(objectives), ["max" if d == "maximize" else "min" for d in directions(objectives)]

    def define_by_run(self, trial) -> dict:
        return self.space.sample(trial, self.num_layers)

    def cluster_ready(self, cpus: float, gpus: float) -> None:
        from allocsearch.search.study import StudyError

        s = self.study.settings
        self.budget.check_resources(s["gpus_per_trial"], gpus)
        if s["cpus_per_trial"] > cpus:
            raise StudyError(f"a trial asks for {s['cpus_per_trial']:g} CPUs but the cluster has {cpus:g}; "
                             f"fix: lower --cpus-per-trial")
        self.emit("cluster", cpus=cpus, gpus=gpus)

    def schedule(self) -> dict:
        """The scheduler's time axis: training steps; the first rung at the first checkpoint."""
        steps = int(_top(self.space, "steps", 60))
        every = int(_top(self.space, "eval_every", 0) or steps)
        return {"max_t": steps, "grace_period": min(every, steps)}

    # ------------------------------------------------------------------------------ the loop
    def propose(self):
        """The next trial's config for Ray, None to ask again later, or "finished"."""
        if self._user_stop or self.end_reason:
            return "finished"
        if self.pending is None:
            trial = self.ostudy.ask()
            self.pending = (trial, self.space.sample(trial, self.num_layers))
        trial, params = self.pending
        spec = self.space.trial_spec(params, self.num_layers)
        features = _features(spec)
        # until the cost model has seen trials its prediction is a guess: admit with room to spare
        predicted = self.cost.predict(features) * self.devices * (UNSEEN_FACTOR if self.cost.n_observed < 2 else 1.0)
        first = self.cost.predict_to_step(features, self.schedule()["grace_period"]) * self.devices
        cap = self.keeper.admit(trial.number, predicted, first, running=len(self.running))
        if cap is None:
            if self.running:
                return None  # wait for a running trial to give back its reservation
            self._not_run(trial, "nothing more fits in the budget")
            self.pending = None
            left = self.budget.format(self.keeper.remaining())
            self.end_reason = (f"nothing more fits: {left} left, the next trial needs about "
                               f"{self.budget.format(first)} to its first checkpoint")
            return "finished"
        self.pending = None
        number = trial.number
        spec["name"] = f"trial-{number:04d}"
        self.study.write_trial_config(number, spec)
        summary = self.space.summarize(params)
        experts = _experts(spec, self.num_layers)
        for key, value in (("summary", summary), ("predicted_cost", predicted), ("cap", cap),
                           ("features", features), ("session", self.session), ("experts", experts)):
            trial.set_user_attr(key, value)
        cap_wall = cap if self.budget.unit == "wall" else cap / self.devices
        self.running[number] = {"trial": trial, "params": params, "features": features, "start": None,
                                "predicted": predicted, "cap": cap, "last": None}
        self.emit("admitted", number=number, summary=summary, predicted=predicted, cap=cap, experts=experts)
        return {"number": number, "spec": spec, "trial_dir": str(self.study.trial_dir(number).resolve()),
                "data_dir": self.study.settings.get("data_dir"), "devices": self.devices,
                "threads": max(1, int(self.study.settings["cpus_per_trial"])),
                "cap_wall_seconds": cap_wall,
                "deadline": time.time() + max(1.0, cap_wall * 0.99 - CAP_SLACK_SECONDS)}

    def on_start(self, number: int) -> None:
        if number in self.running:
            self.running[number]["start"] = self.clock()
            self.study.ledger.record_trial(number, 0.0, self.devices, session=self.session)
            self.emit("started", number=number)

    def on_result(self, number: int, result: dict) -> None:
        info = self.running.get(number)
        if info is None or result.get("final"):
            return
        info["last"] = result
        if len(self.study.objectives) == 1 and "objective" in result:
            info["trial"].report(float(result["objective"]), int(result["step"]))
        self._beat(number)
        self.emit("checkpoint", number=number, step=result["step"], objective=result.get("objective"))

    def on_complete(self, number: int, result: dict | None, error: bool) -> None:
        from optuna.trial import TrialState

        info = self.running.pop(number, None)
        if info is None:
            return
        trial = info["trial"]
        wall = self.clock() - info["start"] if info["start"] is not None else 0.0
        spend = wall * self.devices
        self.study.ledger.record_trial(number, wall, self.devices, final=True, session=self.session)
        self.keeper.finish(number, spend)
        last = result or info["last"] or {}  # the result that ended it (Tune passes it here, not to on_result)
        final = last if last.get("final") else None
        attrs = {"device_seconds": spend, "wall_seconds": wall, "steps": int(last.get("step", 0)),
                 "trainable_params": last.get("trainable_params")}
        if error or (final and final.get("failure")) or not last:
            state, tstate = "failed", TrialState.FAIL
            attrs["failure"] = (final or {}).get("failure") or self.errors.pop(number, None) or \
                "the trial's worker ended without a result"
        elif final and final.get("status") == "completed":
            state, tstate = "completed", TrialState.COMPLETE
        else:
            state, tstate = "pruned", TrialState.PRUNED
            payload_reason = _payload(final).get("stop_reason") if final else None
            attrs["stop_reason"] = payload_reason or ("user" if self._user_stop else "scheduler")
        if last.get("objective") is not None:
            attrs["objective"] = float(last["objective"])
        if final and final.get("result_json"):
            payload = _payload(final)
            if self.study.read_result(number) is None:  # the worker could not write it here (another node)
                from allocsearch.fileio import write_text_atomic

                write_text_atomic(self.study.trial_dir(number) / "results.json", json.dumps(payload, indent=2))
            attrs["train_seconds"] = payload.get("train_seconds", 0.0)
            if attrs["steps"] and payload.get("train_seconds"):
                self.cost.observe(info["features"], wall, attrs["steps"], payload["train_seconds"],
                                  complete=payload.get("status") == "completed")
        elif last.get("train_seconds") and attrs["steps"]:  # pruned at a checkpoint: its step time so far
            attrs["train_seconds"] = last["train_seconds"]
            self.cost.observe(info["features"], wall, attrs["steps"], last["train_seconds"], complete=False)
        attrs["state"] = state
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        values = None
        if tstate == TrialState.COMPLETE:
            values = [float(last[m]) for m in metric_names(self.study.objectives)]
        self.ostudy.tell(trial, values, state=tstate)
        self.failures_in_row = self.failures_in_row + 1 if state == "failed" else 0
        if self.failures_in_row >= self.max_failures:
            self.end_reason = (f"{self.failures_in_row} trials in a row failed (last: {attrs.get('failure')}); "
                               f"fix the cause and start again (--max-failures sets the limit)")
        self.emit("finished", number=number, state=state, objective=attrs.get("objective"),
                  spend=spend, reason=attrs.get("failure") or attrs.get("stop_reason"))

    def note_error(self, number: int, reason: str) -> None:
        self.errors[number] = reason

    def tick(self) -> None:
        """Called by Tune's loop: heartbeat the ledger, notice a stop request."""
        now = self.clock()
        if now - self._last_beat < HEARTBEAT_SECONDS:
            return
        self._last_beat = now
        for number in self.running:
            self._beat(number)
        self.study.ledger.record_session(self.session, now - self.session_start)
        if not self._user_stop and self.study.stop_requested():
            self._user_stop = True
            self.emit("stopping", running=len(self.running))
        self.emit("tick", spent=self.spent(), running=len(self.running))

    def _beat(self, number: int) -> None:
        info = self.running[number]
        if info["start"] is not None:
            wall = self.clock() - info["start"]
            self.study.ledger.record_trial(number, wall, self.devices, session=self.session)
            self.keeper.update(number, wall * self.devices)

    def stopping(self) -> bool:
        return self._user_stop

    def spent(self) -> float:
        """Spend so far: finished trials plus running trials' spend (budget units)."""
        return self.keeper.spent() + self.keeper.in_flight()

    def _not_run(self, trial, reason: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("state", "not_run")
        trial.set_user_attr("failure", reason)
        self.ostudy.tell(trial, None, state=TrialState.FAIL)

    # ------------------------------------------------------------------------------ the end
    def close(self) -> None:
        """After Tune returns (or fails): nothing sampled is left RUNNING, the session's time is recorded."""
        if self.pending is not None:
            self._not_run(self.pending[0], "sampled when the search ended")
            self.pending = None
        self.study.ledger.record_session(self.session, self.clock() - self.session_start)
        if self._user_stop:
            self.end_reason = self.end_reason or "stopped by 'allocsearch stop'"
            self.study.clear_stop()
        if self.end_reason is None:
            self.end_reason = "the budget is spent" if self.keeper.exhausted() else "the search ended"


def _top(space: SearchSpace, key: str, default):
    """A fixed training setting, or the top of its range where the space searches it."""
    if key in space.train_dims:
        return max(space.train_dims[key].extremes())
    return space.train.get(key, default)


def _tokens_per_step(train: dict) -> int:
    return int(train.get("batch_size", 8)) * int(train.get("max_length", 256)) * int(train.get("grad_accum", 1))


def _features(spec: dict) -> dict:
    train = spec["train"]
    return {"method": spec["allocation"].get("method", "lora"), "steps": int(train.get("steps", 60)),
            "tokens_per_step": _tokens_per_step(train), "eval_examples": int(train.get("eval_examples") or 0)}


def _experts(spec: dict, num_layers: int) -> list[int] | None:
    """Experts per layer of a trial's allocation (what status and the live view draw)."""
    from allocsearch.trial import resolve_allocation

    try:
        return resolve_allocation(spec["allocation"], num_layers).experts
    except Exception:  # noqa: BLE001 - drawing only; the trial itself reports a bad allocation
        return None


def _payload(final: dict | None) -> dict:
    return json.loads(final["result_json"]) if final and final.get("result_json") else {}
