"""Replay a search on a recorded table, on a simulated clock: the controller's own code (admission, the
cost model, the confirmation phase, the samplers and priors, the rungs of early stopping) runs as in a live
search; only the executor differs. It plays Ray Tune's part: it starts the trials the controller proposes
(``max_concurrent`` at once), and answers each from the table's recorded run of that configuration on one
of its seeds (checkpoints at their recorded device-seconds), stopping trials with the scheduler the live
search gives Tune (``executor.make_scheduler``: the noise-aware rungs, confirmation runs never stopped),
and by the budget cap the worker enforces live.

Which recorded seed answers a run: the search's seed s of a configuration is the table's seed
``perm[s]``, with ``perm`` a random permutation per (replay seed, configuration): every replay sees other
draws of the seed noise, and a confirmation run never repeats a recorded seed (at most as many seeds as
the table has).
"""
from __future__ import annotations

import contextlib
import heapq
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from allocsearch.bench.table import Table
from allocsearch.search.launch import FINISHED, Launch
from allocsearch.study.confidence import config_key
from allocsearch.study.records import Attr

# name -> settings of the study (see ``allocsearch.study.settings.Execution``)
STRATEGIES = {
    "default": {"sampler": "tpe", "priors": True, "scheduler": "asha", "confirm": 0.2, "noise_aware": True},
    "default-cheapest": {"sampler": "tpe", "priors": True, "scheduler": "asha", "confirm": 0.2, "noise_aware": True,
                         "prefer": "cheapest"},
    "default-no-confirm": {"sampler": "tpe", "priors": True, "scheduler": "asha", "confirm": 0.0, "noise_aware": True},
    "default-plain-asha": {"sampler": "tpe", "priors": True, "scheduler": "asha", "confirm": 0.2, "noise_aware": False},
    "tpe-no-priors": {"sampler": "tpe", "priors": False, "scheduler": "asha", "confirm": 0.2, "noise_aware": True},
    # the default as it was before its random start drew without replacement (``samplers.FreshStart``)
    "default-optuna-start": {"sampler": "tpe", "priors": True, "scheduler": "asha", "confirm": 0.2,
                             "noise_aware": True, "fresh_start": False},
    "priors-only": {"sampler": "random", "priors": True, "scheduler": "none", "confirm": 0.0, "only_priors": True},
    "random": {"sampler": "random", "priors": False, "scheduler": "none", "confirm": 0.0},
    "random-asha": {"sampler": "random", "priors": False, "scheduler": "asha", "confirm": 0.0, "noise_aware": False},
    "grid": {"sampler": "grid", "priors": False, "scheduler": "none", "confirm": 0.0},
}
STARTUP_SECONDS = 0.0  # the table's device-seconds already count each trial from Tune's start


@dataclass
class Trace:
    """What one replayed search did: at each trial's end, the spend so far and what it would export."""
    strategy: str
    seed: int
    budget: float
    points: list = field(default_factory=list)  # (device-seconds spent, exported key, single-seed argmax key)
    trials: int = 0
    confirm_trials: int = 0
    confirm_seconds: float = 0.0
    confirm_cut: int = 0  # confirmation runs the budget cut short (they count for nothing)
    confirm_given: float = 0.0  # what the confirmation phase could spend when it started (reserve + leftover)
    spent: float = 0.0
    end_reason: str | None = None
    runs: list = field(default_factory=list)  # (configuration, the table's seed that answered, confirmation?)

    def export_at(self, seconds: float) -> str | None:
        """The configuration the search would export after ``seconds`` of spend (None before any)."""
        key = None
        for spent, exported, _ in self.points:
            if spent > seconds:
                break
            key = exported
        return key

    @property
    def final(self) -> str | None:
        return self.points[-1][1] if self.points else None

    @property
    def argmax(self) -> str | None:
        """The single-seed argmax before any confirmation run (what a search without one exports)."""
        return self.points[-1][2] if self.points else None


class SeedDraws:
    """Which of the table's seeds answers a configuration's s-th run: ``perm[s]``, ``perm`` a random permutation
    of the table's seed indices per configuration, drawn from the replay's generator (see the module)."""

    def __init__(self, table: Table, rng: random.Random):
        self.table, self.rng = table, rng
        self.perm: dict[str, list[int]] = {}

    def run(self, key: str, params: dict, s: int):
        n = len(self.table.seeds)
        perm = self.perm.setdefault(key, self.rng.sample(range(n), n))
        return self.table.run(params, perm[s % n])


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def replay(table: Table, strategy: str, *, budget_seconds: float, seed: int, max_concurrent: int = 1,
           workdir: str | Path | None = None, keep: str | Path | None = None) -> Trace:
    """Run one search of ``strategy`` with ``budget_seconds`` device-seconds against the table; its study
    lives in memory in a temporary folder, or with ``keep`` in a study folder there with the live
    search's storage (``allocsearch.bench.scale`` measures it)."""
    from allocsearch.search.budget import Budget
    from allocsearch.search.controller import Controller
    from allocsearch.search.ray.executor import make_scheduler
    from allocsearch.search.samplers import sampler_for
    from allocsearch.study.settings import EXECUTION_DEFAULTS
    from allocsearch.search.space.space import SearchSpace
    from allocsearch.study.folder import MEMORY, Study

    plan = STRATEGIES[strategy]
    space = SearchSpace.from_dict(table.space, source="table")
    layers = table.num_layers
    cpus = float(table.card.get("cpus_per_trial") or 1.0)
    unit = table.card.get("budget_unit") or "cpu"
    settings = {"name": f"replay-{strategy}-{seed}", "model": space.model, "data": space.data, "data_dir": None,
                "space": "table", "space_fingerprint": space.fingerprint(), "objectives": ["accuracy"],
                "budget": Budget.of_seconds(budget_seconds, unit).to_dict(), "seed": seed,
                "storage": MEMORY if keep is None else None,
                "priors": plan["priors"] and space.use_priors, "num_layers": layers, "scheduler": plan["scheduler"],
                "cpus_per_trial": cpus, "gpus_per_trial": 0.0, "max_failures": 5, "sampler": plan["sampler"],
                "confirm": plan["confirm"], "max_seeds": len(table.seeds), "mlflow": False,
                # no declared noise: the search measures its own from its repeats, as `allocsearch start` does
                # unless given --noise (with the table's 0.0123 declared: 0.8158 / 0.8180 at 25 / 50%, without
                # 0.8169 / 0.8170, inside one standard error)
                "noise": EXECUTION_DEFAULTS["noise"],
                "noise_aware_stopping": bool(plan.get("noise_aware")), "prefer": plan.get("prefer", "best")}
    folder = contextlib.nullcontext(str(keep)) if keep is not None else \
        tempfile.TemporaryDirectory(prefix="as-replay-", dir=workdir)
    with folder as tmp:
        study = Study.create(tmp, settings, json.dumps(table.space))
        clock = _Clock()
        trace = Trace(strategy, seed, budget_seconds)

        latest: dict = {}  # the controller's best after each trial's end (what export --best names then)

        def on_event(kind, **data):
            if kind == "confirming":
                trace.confirm_given = data["reserve"]
            elif kind == "finished":
                latest["best"] = data["best"]

        sampler = sampler_for(plan["sampler"], seed, space, layers, fresh_start=plan.get("fresh_start", True))
        ctl = Controller(study, space, num_layers=layers, sampler=sampler, clock=clock, on_event=on_event)
        scheduler = make_scheduler(ctl.schedule(plan["scheduler"]))  # the very scheduler Tune runs live
        _Loop(table, ctl, clock, scheduler, trace, random.Random(seed), max_concurrent, plan.get("only_priors"),
              latest).run()
        ctl.close()
        trace.end_reason, trace.spent = ctl.end_reason, ctl.spent()
    return trace


@dataclass
class _TuneTrial:
    """What Tune's scheduler reads of a trial: its id and the config the controller proposed."""
    trial_id: str
    config: dict


class _Loop:
    """Tune's part on a simulated clock: an event queue of the running trials' next checkpoints."""

    def __init__(self, table, ctl, clock, scheduler, trace, rng, slots, only_priors, latest):
        from ray.tune.schedulers import TrialScheduler

        self.table, self.ctl, self.clock, self.scheduler, self.trace = table, ctl, clock, scheduler, trace
        self.stop = TrialScheduler.STOP
        self.slots, self.only_priors, self.latest = slots, only_priors, latest
        self.seeds = SeedDraws(table, rng)
        self.events: list = []  # (time, number, index into the run's checkpoints; len = the end)
        self.running: dict[int, dict] = {}
        self.done = False

    def run(self) -> None:
        while True:
            self._fill()
            if not self.events:
                break
            t, number, i = heapq.heappop(self.events)
            self.clock.t = t
            self._deliver(number, i)
            self.ctl.tick()

    def _fill(self) -> None:
        while not self.done and len(self.running) < self.slots:
            launch = self.ctl.propose()
            if launch == FINISHED:
                self.done = True
            if not isinstance(launch, Launch):
                return
            if self.only_priors and Attr.PRIOR not in self.ctl.running[launch.number].trial.user_attrs:
                self.ctl.end_reason, self.done = "every prior has run", True
                return  # close() records the admitted, never started trial
            self._start(launch)

    def _start(self, launch: Launch) -> None:
        number, info = launch.number, self.ctl.running[launch.number]
        run = self.seeds.run(info.key, info.params, info.seed)
        self.ctl.on_start(number)
        start = self.clock.t
        self.running[number] = {"run": run, "start": start, "devices": launch.devices, "last": None,
                                "cap_at": start + launch.cap_wall_seconds, "confirm": launch.confirm,
                                "tune": _TuneTrial(str(number), launch.to_config())}
        self.trace.runs.append((info.key, run.seed, launch.confirm))
        self._next(number, 0)

    def _next(self, number: int, i: int) -> None:
        """Queue the run's checkpoint ``i`` (its end when i = the number of checkpoints), or its budget cap
        (index -1) when the cap comes first: the worker stops there with its last checkpoint."""
        r = self.running[number]
        run = r["run"]
        seconds = run.checkpoints[i][2] if i < len(run.checkpoints) else run.device_seconds
        t = r["start"] + seconds / r["devices"]
        heapq.heappush(self.events, (t, number, i) if t <= r["cap_at"] else (r["cap_at"], number, -1))

    def _deliver(self, number: int, i: int) -> None:
        r = self.running[number]
        run = r["run"]
        if i == -1 or i == len(run.checkpoints):
            if i == -1 and r["confirm"]:
                self.trace.confirm_cut += 1
            self._end(number, cap=i == -1)
            return
        step, value, seconds = run.checkpoints[i]
        report = {"number": number, "step": step, "objective": value, "device_seconds": seconds,
                  "wall_seconds": seconds / r["devices"], "trainable_params": run.trainable_params,
                  "train_seconds": (run.train_seconds or 0.0) * step / max(run.steps, 1)}
        self.ctl.on_result(number, report)
        r["last"] = report
        if self.scheduler.on_trial_result(None, r["tune"], report) == self.stop:
            self._finish(number, report)
            return
        self._next(number, i + 1)

    def _end(self, number: int, cap: bool) -> None:
        r = self.running[number]
        run = r["run"]
        if cap:  # stopped by its budget cap: a final report with its last checkpoint, status stopped
            last = r["last"] or {}
            result = {"status": "stopped", "stop_reason": "budget", "steps": last.get("step", 0),
                      "train_seconds": last.get("train_seconds")}
            report = {"final": True, "status": "stopped", "step": last.get("step", 0), "objective": last.get("objective"),
                      "trainable_params": run.trainable_params, "result_json": json.dumps(result)}
        else:
            result = {"status": "completed", "steps": run.steps, "train_seconds": run.train_seconds,
                      "validation": {"macro_balanced_accuracy": run.final}, "trainable_params": run.trainable_params}
            report = {"final": True, "status": "completed", "step": run.steps, "objective": run.final,
                      "trainable_params": run.trainable_params, "result_json": json.dumps(result)}
        self.scheduler.on_trial_result(None, r["tune"], report)  # Tune shows the scheduler the last report too
        self._finish(number, report)

    def _finish(self, number: int, report: dict) -> None:
        r = self.running.pop(number)
        spent_before = self.ctl.keeper.spent()
        self.ctl.on_complete(number, report, error=False)
        self.trace.trials += 1
        if r["confirm"]:
            self.trace.confirm_trials += 1
            self.trace.confirm_seconds += self.ctl.keeper.spent() - spent_before
        best = self.latest.get("best")  # what export --best names now: the controller's own, as it emits it
        # Optuna's best trial: the single highest score of the search phase (no confirmation run counted)
        done = [r for r in self.ctl.books.records() if r.completed and r.confirm_of is None]
        argmax = max(done, key=lambda r: (r.objective, -r.number), default=None)
        self.trace.points.append((self.ctl.spent(), config_key(best["params"]) if best else None,
                                  config_key(argmax.params) if argmax else None))


__all__ = ["STRATEGIES", "SeedDraws", "Trace", "replay"]
