"""The search controller: the loop a reader follows top to bottom.

    open or create the study -> recover trials a dead controller left running -> enqueue paper priors
    -> Ray Tune asks for trials (``propose``): Optuna samples one, the cost model predicts it, the budget
       admits it with a cap or not -> trials report checkpoints (``on_result``: Optuna's intermediate
       values, the live view) -> a trial ends (``on_complete``: Optuna told COMPLETE / PRUNED / FAIL, the
       ledger's final record, the cost model learns) -> every loop tick (``tick``) the ledger gets a
       heartbeat of each running trial's spend, so a kill -9 loses at most a few seconds of accounting
    -> no trial fits in what is left (or the user stops, or trials keep failing) -> summary.

The executor interface (what ``ray.executor.run`` calls, and the replay executor on a simulated clock):
``propose()`` -> a ``launch.Launch``, None (ask again later) or ``FINISHED``; ``on_start(n)``;
``on_result(n, report)`` per checkpoint; ``on_complete(n, report | None, error)`` at the end, then
``note_error(n, why)`` for a dead worker; ``tick()`` every loop step; ``stopping()`` / ``interrupted`` to
stop trials; ``schedule(name)`` the scheduler's settings; ``emit("cluster", ...)`` once the cluster is checked.

Ray specifics live in ``ray/`` (the executor, and the worker in the trial's process); what Optuna is told
in ``bookkeeping``; budget, storage and space in their own modules; nothing here knows the command line or
MLflow: ``on_event(kind, **data)`` lets a caller show progress or track the study.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

from allocsearch.allocation.config import experts_per_layer
from allocsearch.search.bookkeeping import Bookkeeper
from allocsearch.search.budget import (Budget, BudgetKeeper, CostModel, devices_per_trial, tokens_per_step,
                                       trial_features)
from allocsearch.search.confirmation import WAIT, Confirmation, Reserve, fresh_seed
from allocsearch.search.launch import FINISHED, Launch, RunningTrial
from allocsearch.search.report import TrialReport
from allocsearch.search.rungs import EVIDENCE_PAIRS
from allocsearch.search.samplers import grid_repeats
from allocsearch.search.space.space import SearchSpace
from allocsearch.study.choice import best_of
from allocsearch.study.confidence import config_key, estimates, noise_of
from allocsearch.study.folder import Study, directions, metric_names, trial_name
from allocsearch.study.ledger import device_seconds
from allocsearch.study.records import NOTHING_TO_TRAIN, Attr, State
from allocsearch.study.settings import Execution
from allocsearch.study.storage import TrialStore
from allocsearch.training.config import TrainConfig

HEARTBEAT_SECONDS = 2.0
CAP_SLACK_SECONDS = 2.0
UNSEEN_FACTOR = 1.6  # prediction headroom before two trials have been observed
DEFAULT_STARTUP_SECONDS = 3.0  # a Ray worker's start before its trial's clock starts, until one is seen
_PHASE_OVER = object()  # ``_admit``: nothing more fits, the phase is over


class Controller:
    def __init__(self, study: Study, space: SearchSpace, *, num_layers: int, sampler=None,
                 on_event: Callable[..., None] | None = None, clock: Callable[[], float] = time.monotonic):
        s = study.settings
        self.study, self.space, self.num_layers = study, space, num_layers
        self.execution = run = Execution.of(s)
        self.budget = Budget.from_dict(s["budget"])
        self.devices = devices_per_trial(self.budget.unit, run.cpus_per_trial, run.gpus_per_trial)
        self.emit = on_event or (lambda kind, **data: None)
        self.clock = clock
        self.sampler = sampler
        self.store = TrialStore.open(study, sampler)
        self.books = Bookkeeper(study, self.store)
        self.recovered = self.books.recover()
        if s.get("priors", True) and not s.get("priors_enqueued"):
            for label, params in space.priors(num_layers):
                self.store.enqueue(params, {Attr.PRIOR: label}, skip_if_exists=True)
            study.save_settings(priors_enqueued=True)
        self.session = study.ledger.next_session()
        self.session_start = clock()
        study.ledger.record_session(self.session, 0.0)
        self.keeper = BudgetKeeper(self.budget, study.ledger.spent(self.budget.unit), clock=clock)
        self.cost = self._cost_model()
        self.running: dict[int, RunningTrial] = {}
        self.errors: dict[int, str] = {}
        self._dead: dict[int, RunningTrial] = {}  # ended with an error, waiting for Tune to say why
        self._startups: list[float] = []  # Tune's start -> the worker's clock, per trial
        self.failed_this_session = False
        self.started_any = False  # a trial of this session started (a refused start changes nothing)
        self.interrupted: str | None = None  # "SIGINT" / "SIGTERM" when the user interrupted the search
        self.pending = None  # (optuna trial, params): sampled, waiting for budget
        self.failures_in_row = 0
        self.end_reason: str | None = None
        self._last_beat = -math.inf
        self._user_stop = False
        study.clear_stop()
        # the confirmation phase (single objective): a reserve of the budget, held back while the search runs
        fraction = float(run.confirm or 0.0) if len(study.objectives) == 1 else 0.0
        self.confirm = Confirmation(max_seeds=run.max_seeds, noise=run.noise) if fraction else None
        self.reserve = Reserve(self.keeper, self.confirm, self.books.reserve_left(fraction * self.budget.seconds),
                               lambda kind, **data: self.emit(kind, **data))  # emit may be rebound (a tracker)

    # ------------------------------------------------------------------------------ set-up
    def _cost_model(self) -> CostModel:
        model = CostModel.for_model(self.space.model, tokens_per_step(self.space.train))
        for seen in self.books.cost_observations():  # a resumed study: learn from what already ran
            model.observe(*seen[:4], complete=seen[4])
        return model

    def noise(self) -> float | None:
        """Seed noise (std): the study's own (its repeated configurations), else the declared one, else None."""
        return noise_of(estimates(self.books.records()), self.execution.noise)

    def tune_metrics(self) -> tuple[list[str], list[str]]:
        """The metric names trials report and Tune's modes, one per objective."""
        objectives = self.study.objectives
        return metric_names(objectives), ["max" if d == "maximize" else "min" for d in directions(objectives)]

    def define_by_run(self, trial) -> dict:
        return self.space.sample(trial, self.num_layers)

    def schedule(self, scheduler: str = "asha") -> dict:
        """The scheduler and its time axis: training steps; the first rung at the first checkpoint. A
        multi-objective study is not pruned: stopping on accuracy alone would kill the cheap trials that
        belong on the Pareto front."""
        name = scheduler if len(self.study.objectives) == 1 else "none"
        careful = self.execution.noise_aware_stopping
        return {"scheduler": name, "max_t": self._steps(), "grace_period": self._grace_period(),
                "margin": (self.noise() or 0.0) if careful else 0.0, "min_pairs": EVIDENCE_PAIRS if careful else 0,
                "history": self.books.rung_history()}

    def _steps(self) -> int:
        """The most training steps a trial of the space runs (ASHA's time axis)."""
        return int(self.space.train_top("steps", TrainConfig.steps))

    def _grace_period(self) -> int:
        """Steps to a trial's first checkpoint (ASHA's first rung)."""
        steps = self._steps()
        return min(int(self.space.train_top("eval_every", 0) or steps), steps)

    # ------------------------------------------------------------------------------ the loop
    def propose(self) -> Launch | str | None:
        """The next trial to launch, None to ask again later (a running trial may give budget back, the
        confirmation race waits for its runs), or ``FINISHED``. A phase that ends here (the grid used up,
        nothing more fits) hands over to the confirmation phase, or ends the search with ``end_reason``."""
        while not (self._user_stop or self.end_reason or self.interrupted):
            if self.pending is None:
                sampled = self._sample()
                if sampled is WAIT:
                    return None
                if sampled is None:
                    continue  # the search phase ended: the race goes on, or end_reason is set
                self.pending = sampled
            admitted = self._admit()
            if admitted is not _PHASE_OVER:
                return admitted
        return FINISHED

    def _sample(self):
        """(optuna trial, params) of the next trial: the confirmation race's next run, else the sampler's
        draw; ``WAIT`` while the race waits for its runs; None when a phase ended (``_phase_over``)."""
        if self.reserve.phase == "confirm":
            plan = self.confirm.next(self.books.records(), {(r.key, r.seed) for r in self.running.values()},
                                     frozenset(self.reserve.too_dear))
            if plan == WAIT:
                return WAIT
            if plan is None:
                self.end_reason = f"confirmation ended: {self.confirm.ended}{self.reserve.out_of_budget()}"
                return None
            params, seed, first = plan
            self.store.enqueue(params, {Attr.CONFIRM: first, Attr.SEED: seed})
        trial = self.store.ask()
        params = self.space.sample(trial, self.num_layers)
        if self.space.trains_nothing(params, self.num_layers):  # every layer group drew 0: costs nothing
            self.books.not_run(trial.number, NOTHING_TO_TRAIN, infeasible=True)
            return None
        if self.study.settings.get("sampler") == "grid" and grid_repeats(self.store.ostudy, trial):
            self._phase_over(trial, "the grid is used up", lambda: "every point of the grid has run")
            return None
        return trial, params

    def _admit(self) -> Launch | None | object:
        """The pending trial's ``Launch`` when the budget admits it; None to wait for a running trial's
        reservation; ``_PHASE_OVER`` when nothing more fits (``_phase_over``)."""
        trial, params = self.pending
        spec = self.space.trial_spec(params, self.num_layers)
        spec["train"].update(trial.user_attrs.get(Attr.OOM_RETRY) or {})  # half the batch, twice the accumulation
        seed = spec["train"]["seed"] = self._seed(trial, params, int(spec["train"].get("seed", 0)))
        features = trial_features(spec)
        # until the cost model has seen trials its prediction is a guess: admit with room to spare
        guess = device_seconds(self.cost.predict(features), self.devices)
        predicted = guess * (UNSEEN_FACTOR if self.cost.n_observed < 2 else 1.0)
        first = device_seconds(self.cost.predict_to_step(features, self._grace_period()), self.devices)
        self.reserve.release_if_small(guess)
        whole = Attr.CONFIRM in trial.user_attrs  # a cut confirmation run counts for nothing
        cap = self.keeper.admit(trial.number, predicted, first, running=len(self.running), whole=whole)
        if cap is None:
            if self.running:
                return None  # wait for a running trial to give back its reservation
            self.pending = None
            if whole and self.reserve.phase == "confirm":  # the race goes on with finalists whose run still fits
                self.reserve.too_dear[config_key(params)] = predicted * self.keeper.margin
                self._not_run(trial, "its whole confirmation run does not fit in what is left of the budget")
                return _PHASE_OVER
            self._phase_over(trial, "nothing more fits in the budget", lambda: self._nothing_fits(first))
            return _PHASE_OVER
        self.pending = None
        running = RunningTrial(trial=trial, params=params, key=config_key(params), seed=seed, train=spec["train"],
                               features=features, predicted=predicted, cap=cap)
        return self._launch(running, spec)

    def _phase_over(self, trial, why: str, end_reason: Callable[[], str]) -> None:
        """``trial`` will not run (``why``); the search phase is over: the confirmation phase begins with the
        reserve, or, with nothing to confirm or nothing left to spend, the search ends (``end_reason()``)."""
        self._not_run(trial, why)
        if not self.reserve.begin(self.books.records()):
            self.end_reason = end_reason()

    def _nothing_fits(self, first: float) -> str:
        """Why the search ended, in the numbers admission compared: what is free against what the next trial
        needs to reach its first checkpoint (a search trial may be cut there by the budget)."""
        return (f"nothing more fits: {self.budget.format(self.keeper.free())} left, the next trial needs about "
                f"{self.budget.format(first)} to reach its first checkpoint")

    def _launch(self, running: RunningTrial, spec: dict) -> Launch:
        """Record an admitted trial (its config, its user attrs), keep it as running, tell the listeners."""
        trial, number, cap = running.trial, running.trial.number, running.cap
        spec["name"] = trial_name(number)
        self.study.write_trial_config(number, spec)
        summary = self.space.summarize(running.params)
        experts = experts_per_layer(spec["allocation"], self.num_layers)
        for key, value in ((Attr.SUMMARY, summary), (Attr.PREDICTED, running.predicted), (Attr.CAP, cap),
                           (Attr.SEED, running.seed), (Attr.FEATURES, running.features), (Attr.SESSION, self.session),
                           (Attr.EXPERTS, experts)):
            trial.set_user_attr(key, value)
        self.running[number] = running
        self.emit("admitted", number=number, summary=summary, predicted=running.predicted, cap=cap, experts=experts,
                  seed=running.seed, confirm=trial.user_attrs.get(Attr.CONFIRM))
        cap_wall = cap if self.budget.unit == "wall" else cap / self.devices
        return Launch(number=number, spec=spec, trial_dir=str(self.study.trial_dir(number).resolve()),
                      data_dir=self.study.settings.get("data_dir"), devices=self.devices,
                      threads=max(1, int(self.execution.cpus_per_trial)), gpus=float(self.execution.gpus_per_trial),
                      cap_wall_seconds=cap_wall, confirm=Attr.CONFIRM in trial.user_attrs,
                      # a duration on the worker's own clock (nodes' clocks need not agree), less the worker's
                      # start-up, which the controller counts from Tune's start and the worker cannot see
                      budget_seconds=max(1.0, cap_wall * 0.99 - CAP_SLACK_SECONDS - self.startup_seconds()))

    def _seed(self, trial, params: dict, default: int) -> int:
        """A confirmation run's own seed, else ``confirmation.fresh_seed`` (a repeated draw: the next seed)."""
        if Attr.SEED in trial.user_attrs:
            return int(trial.user_attrs[Attr.SEED])
        if Attr.RETRY_OF in trial.user_attrs:
            return default
        return fresh_seed(self.books.records(), params, trial.number, default, self.execution.max_seeds)

    def startup_seconds(self) -> float:
        """Seconds from Tune starting a trial to its worker's clock starting: the median seen so far."""
        return statistics.median(self._startups) if self._startups else DEFAULT_STARTUP_SECONDS

    def on_start(self, number: int) -> None:
        if number in self.running:
            self.running[number].start = self.clock()
            self.started_any = True
            self.study.ledger.record_trial(number, 0.0, self.devices, session=self.session)
            self.emit("started", number=number)

    def on_result(self, number: int, result: dict) -> None:
        info, report = self.running.get(number), TrialReport.parse(result)
        if info is None or report is None or report.final:
            return
        if info.last is None and info.start is not None:
            self._startups.append(max(0.0, self.clock() - info.start - report.wall_seconds))
        info.last = report
        self._beat(number)
        self._report(number, info, report)

    def _report(self, number: int, info: RunningTrial, report: TrialReport) -> None:
        """A validation checkpoint, once per step -> Optuna's intermediate value (single objective) and the
        live view / tracker. Also the checkpoint a scheduler stopped the trial on (Tune passes that one to
        ``on_complete`` only): the value a pruned trial keeps is the one it was judged on."""
        if report.final or report.step in info.reported:
            return
        info.reported.add(report.step)
        if info.start is not None:  # device-seconds to this checkpoint, as the ledger charges them
            info.times[str(report.step)] = round(device_seconds(self.clock() - info.start, self.devices), 3)
            info.trial.set_user_attr(Attr.CHECKPOINT_SECONDS, info.times)
        if report.objective is not None:
            self.books.report(number, report.step, report.objective)
        self.emit("checkpoint", number=number, step=report.step, objective=report.objective)

    def on_complete(self, number: int, result: dict | None, error: bool) -> None:
        """A trial ended. Tune calls this for a dead worker BEFORE its callbacks learn why (``note_error``):
        such a trial waits in ``_dead`` for its reason, at most until the next tick."""
        info = self.running.pop(number, None)
        if info is None:
            return
        info.wall = self.clock() - info.start if info.start is not None else 0.0
        self.keeper.finish(number, device_seconds(info.wall, self.devices))
        if error and number not in self.errors:
            self._dead[number] = info
            return
        self._record(number, info, result, error)

    def _record(self, number: int, info: RunningTrial, result: dict | None, error: bool) -> None:
        """A trial's end -> the study's records (``Bookkeeper.end``), the cost model, the failure count."""
        last = TrialReport.parse(result) or info.last  # what ended it (Tune passes it here, not to on_result)
        if last is not None and not last.final:
            self._report(number, info, last)  # the checkpoint the scheduler (or a stop) acted on reaches Optuna
        state, attrs, payload = self.books.end(
            number, last, error=error, failure=self.errors.pop(number, None) if error else None,
            user_stop=self._user_stop, wall=info.wall, devices=self.devices, session=self.session)
        if attrs.get(Attr.TRAIN_SECONDS) and attrs[Attr.STEPS]:  # a stopped trial teaches its step time only
            self.cost.observe(info.features, info.wall, attrs[Attr.STEPS], attrs[Attr.TRAIN_SECONDS],
                              complete=payload.get("status") == "completed")
        self.failed_this_session |= state in State.ENDED_BADLY
        if state == State.OOM and (retry := self.books.retry_smaller(number, info.params, info.train,
                                                                       info.trial.user_attrs)):
            self.emit("oom_retry", number=number, **retry)
        if state != State.OOM:  # a configuration too big for the device is no sign of a broken search
            self.failures_in_row = self.failures_in_row + 1 if state == State.FAILED else 0
        if self.failures_in_row >= self.execution.max_failures:
            self.end_reason = (f"{self.failures_in_row} trials in a row failed (last: {attrs.get(Attr.FAILURE)}); "
                               f"fix the cause and start again (--max-failures sets the limit)")
        best = best_of(self.books.records(), self.execution.noise, self.execution.prefer)  # as status shows it
        self.emit("finished", number=number, state=state, objective=attrs.get(Attr.OBJECTIVE),
                  spend=attrs[Attr.DEVICE_SECONDS], reason=attrs.get(Attr.FAILURE) or attrs.get(Attr.STOP_REASON),
                  best=best.to_dict() if best else None)

    def note_error(self, number: int, reason: str) -> None:
        """Why a worker died (Tune's error, the worker's last stderr lines); ends a trial waiting for it."""
        self.errors[number] = reason
        if number in self._dead:
            self._record(number, self._dead.pop(number), None, True)

    def _flush_dead(self) -> None:
        for number in list(self._dead):
            self._record(number, self._dead.pop(number), None, True)

    def tick(self) -> None:
        """Called by Tune's loop: heartbeat the ledger, notice a stop request."""
        now = self.clock()
        if now - self._last_beat < HEARTBEAT_SECONDS:
            return
        self._last_beat = now
        self._flush_dead()
        for number in self.running:
            self._beat(number)
        self.study.ledger.record_session(self.session, now - self.session_start)
        if not self._user_stop and self.study.stop_requested():
            self._user_stop = True
            self.emit("stopping", running=len(self.running))
        self.emit("tick", spent=self.spent(), running=len(self.running))

    def _beat(self, number: int) -> None:
        info = self.running[number]
        if info.start is not None:
            wall = self.clock() - info.start
            self.study.ledger.record_trial(number, wall, self.devices, session=self.session)
            self.keeper.update(number, device_seconds(wall, self.devices))

    def stopping(self) -> bool:
        return self._user_stop

    def interrupt(self, signal_name: str) -> None:
        """SIGINT / SIGTERM: no new trial; the executor stops the running ones (``close`` records them)."""
        self.interrupted = signal_name
        self.emit("stopping", running=len(self.running), signal=signal_name)

    def spent(self) -> float:
        """Spend so far: finished trials plus running trials' spend (budget units)."""
        return self.keeper.spent() + self.keeper.in_flight()

    def _not_run(self, trial, reason: str) -> None:
        self.books.not_run(trial.number, reason)

    def _requeue(self, trial, params: dict, **attrs) -> None:
        """A configuration that never ran (or ran without a measurement) goes back to the front of the
        queue with what marks it (a paper prior, a retry), so the next start runs it first."""
        keep = {k: v for k, v in trial.user_attrs.items() if k in (Attr.PRIOR, Attr.RETRY_OF, Attr.OOM_RETRY)}
        self.store.enqueue(params, {**keep, **attrs})

    # ------------------------------------------------------------------------------ the end
    def close(self, interrupted: str | None = None) -> None:
        """After Tune returns (or fails): nothing sampled is left RUNNING, the session's time is recorded.
        ``interrupted`` (SIGINT / SIGTERM): trials still running are recorded as stopped by the user, their
        last checkpoint kept (a trial without one: failed, with the reason, so a resume runs it again)."""
        self._flush_dead()
        for number in list(self.running):
            info = self.running[number]
            if info.start is None:
                self.running.pop(number)
                self._not_run(info.trial, "admitted but not started when the search ended")
                self._requeue(info.trial, info.params)
                continue
            if interrupted:
                self._user_stop = True
                self.errors[number] = f"stopped by the user ({interrupted}) before its first checkpoint"
            self.on_complete(number, None, error=info.last is None)
            if interrupted and info.last is None:
                # nothing measured yet, and not the trial's fault: its configuration runs first next time
                self._requeue(info.trial, info.params, retry_of=number)
        if self.pending is not None:
            self._not_run(self.pending[0], "sampled when the search ended")
            self._requeue(*self.pending)
            self.pending = None
        self.study.ledger.record_session(self.session, self.clock() - self.session_start)
        if interrupted:
            self.end_reason = self.end_reason or f"stopped by the user ({interrupted})"
        if self._user_stop:
            self.end_reason = self.end_reason or "stopped by 'allocsearch stop'"
            self.study.clear_stop()
        if self.end_reason is None:
            self.end_reason = "the budget is spent" if self.keeper.exhausted() else "the search ended"

