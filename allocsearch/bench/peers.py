"""The field's own optimizers replayed on a recorded table: what a user would run instead of allocsearch,
from their packages, on the same simulated clock, budget and concurrency as the built-in strategies.

Each peer runs its own loop as its users write it, over the table's search space (sampled through the
space's own define-by-run ``sample``, so every peer sees the same dimensions and choices):

- ``optuna:tpe`` / ``optuna:tpe-hb`` / ``optuna:tpe-sh``: an Optuna study, ``TPESampler(seed=...)`` with no
  pruner / ``HyperbandPruner()`` / ``SuccessiveHalvingPruner()`` (their defaults), driven by ask and tell,
  each checkpoint ``trial.report``-ed and ``trial.should_prune()`` asked. It exports ``study.best_trial``
  (the highest completed score).
- ``ray:asha`` / ``ray:tpe-asha``: Ray Tune's ``ASHAScheduler(time_attr="step", max_t=<steps>,
  grace_period=<first checkpoint>)`` (reduction factor 4, its default) over Tune's random search, or over
  ``OptunaSearch`` (TPE) as Tune's users combine them. The scheduler and the searcher are Ray's objects,
  fed results as Tune feeds them (a stopped trial completes with its last result, which is how Tune tells
  ``OptunaSearch``). It exports what ``ResultGrid.get_best_result(scope="last")`` would: the trial whose
  last result is highest, stopped trials included.
- ``smac:mf``: SMAC3's multi-fidelity facade (``allocsearch.bench.peer_smac``).
- ``ray:bohb``: Ray Tune's ``HyperBandForBOHB`` over ``TuneBOHB`` (``allocsearch.bench.peer_bohb``), the one
  peer that pauses trials and resumes them from their last checkpoint.
- ``syne:asha`` / ``syne:bohb`` / ``syne:asha-bore``: Syne Tune's schedulers, driven as its ``Tuner`` drives
  them (``allocsearch.bench.peer_syne``).

The clock: a trial's checkpoints arrive at its start plus their recorded device-seconds (divided by the
table's CPUs per trial), ``max_concurrent`` trials at once; every running trial spends device-seconds as
it runs, and when the spend reaches the budget everything stops (no trial starts after, the running ones
are cut where they are; a cut trial counts for nothing, as a deadline does to it). A paused trial spends
nothing until it is resumed; it then runs from its last checkpoint (the recorded device-seconds between
checkpoints). A configuration drawn
again runs on another of the table's seeds (a random permutation per configuration and replay seed, as for
the built-in strategies). A draw that trains nothing is told failed and costs nothing.
"""
from __future__ import annotations

import heapq
import random
import shlex
from dataclasses import dataclass

from allocsearch.bench.peer_agent import PAUSE, Resume
from allocsearch.bench.replay import SeedDraws, Trace
from allocsearch.errors import AllocsearchError
from allocsearch.bench.table import Table
from allocsearch.study.confidence import config_key

PEERS = {
    "optuna:tpe": {"family": "optuna", "searcher": "tpe", "pruner": None},
    "optuna:tpe-hb": {"family": "optuna", "searcher": "tpe", "pruner": "hyperband"},
    "optuna:tpe-sh": {"family": "optuna", "searcher": "tpe", "pruner": "successive-halving"},
    "ray:asha": {"family": "ray", "searcher": "random", "scheduler": "asha"},
    "ray:tpe-asha": {"family": "ray", "searcher": "tpe", "scheduler": "asha"},
    "ray:bohb": {"family": "bohb"},  # allocsearch.bench.peer_bohb
    "smac:mf": {"family": "smac"},  # allocsearch.bench.peer_smac
    "syne:asha": {"family": "syne", "scheduler": "asha"},  # allocsearch.bench.peer_syne
    "syne:bohb": {"family": "syne", "scheduler": "bohb"},
    "syne:asha-bore": {"family": "syne", "scheduler": "asha-bore", "needs": ("syne_tune", "xgboost")},
}
# family -> the modules it needs
PACKAGES = {"optuna": ("optuna",), "ray": ("ray.tune",), "smac": ("smac",), "bohb": ("ray.tune", "hpbandster"),
            "syne": ("syne_tune",)}
# Syne Tune without CUDA (its declared xgboost is a CUDA wheel on Linux x86-64): its dependencies with
# xgboost-cpu, then Syne Tune itself without its own. `make install-syne-cpu` and pyproject's peers extra
# carry the same (tests/test_bench_peers.py holds them to it).
SYNE_SPEC = "syne-tune>=0.16,<0.17"
SYNE_CPU_DEPS = ("xgboost-cpu>=2", "dill", "sortedcontainers", "tqdm", "psutil", "statsmodels", "scikit-learn",
                 "pandas")
FIXES = {"syne": f" (without CUDA: pip install {' '.join(map(shlex.quote, SYNE_CPU_DEPS))} && pip install --no-deps "
                 f"{shlex.quote(SYNE_SPEC)})"}  # quoted: a bare >= in a shell redirects
METRIC = "objective"


class PeerError(AllocsearchError):
    """A peer that cannot run here; one line with the fix."""


MAX_MISSES = 1000  # draws in a row that train nothing before a peer is given up


def check_installed(name: str) -> None:
    """One line naming the missing package and the fix, before any replay starts."""
    import importlib.util

    plan = PEERS[name]
    for need in plan.get("needs", PACKAGES[plan["family"]]):
        try:
            found = importlib.util.find_spec(need) is not None
        except ImportError:  # its parent package is missing
            found = False
        if not found:
            raise PeerError(f"--strategies {name}: {need} is not installed; fix: pip install 'allocsearch[peers]'"
                            f"{FIXES.get(plan['family'], '')}")


@dataclass
class _Running:
    handle: object
    key: str
    run: object  # the table's Run that answers it
    start: float
    step: int | None = None  # its last reported checkpoint
    last: float | None = None  # and score
    k: int = -1  # the index of that checkpoint
    done: float = 0.0  # device-seconds it had run when it last started (resumed after a pause)


def replay_peer(table: Table, name: str, *, budget_seconds: float, seed: int, max_concurrent: int = 1) -> Trace:
    """Run peer ``name`` once against the table with ``budget_seconds`` device-seconds."""
    from allocsearch.search.space.space import SearchSpace

    space = SearchSpace.from_dict(table.space, source="table")
    layers = table.num_layers
    family = PEERS[name]["family"]
    if family == "smac":
        from allocsearch.bench.peer_smac import SmacAgent as agent_class
    elif family == "bohb":
        from allocsearch.bench.peer_bohb import BohbAgent as agent_class
    elif family == "syne":
        from allocsearch.bench.peer_syne import SyneAgent as agent_class
    else:
        agent_class = _OptunaAgent if family == "optuna" else _TuneAgent
    more = {"slots": max_concurrent} if family == "bohb" else {}  # TuneBOHB's own concurrency cap
    agent = agent_class(PEERS[name], space, layers, table, seed, **more)
    loop = _Loop(table, agent, Trace(name, seed, budget_seconds), random.Random(seed), max_concurrent,
                 float(table.card.get("cpus_per_trial") or 1.0), lambda params: space.trains_nothing(params, layers))
    return loop.run()


class _Loop:
    def __init__(self, table, agent, trace, rng, slots, cpus, trains_nothing):
        self.table, self.agent, self.trace, self.slots, self.cpus = table, agent, trace, slots, cpus
        self.trains_nothing = trains_nothing
        self.seeds = SeedDraws(table, rng)
        self.drawn: dict[str, int] = {}
        self.running: dict[int, _Running] = {}
        self.paused: dict[int, tuple[int, _Running]] = {}  # id(handle) -> (trial id, its state)
        self.events: list = []  # (wall time, trial id, checkpoint index; len = the end)
        self.now = self.spent_closed = 0.0  # device-seconds of trials that ended
        self.next_id = 0

    def spend(self, t: float) -> float:
        return self.spent_closed + sum((t - r.start) * self.cpus for r in self.running.values())

    def run(self) -> Trace:
        budget = self.trace.budget
        while True:
            self._fill()
            if not self.events:
                break
            t = self.events[0][0]
            if self.spend(t) >= budget:  # the budget runs out before the next event: cut everything there
                rate = len(self.running) * self.cpus
                self.now = self.now + (budget - self.spend(self.now)) / rate
                for i in list(self.running):
                    self._close(i, completed=False)
                break
            t, i, k = heapq.heappop(self.events)
            self.now = t
            self._deliver(i, k)
        self.trace.trials += len(self.paused)  # trials that ended paused (their last results count)
        self.trace.spent = min(self.spend(self.now), budget)
        return self.trace

    def _fill(self) -> None:
        misses = 0
        while len(self.running) < self.slots and self.spend(self.now) < self.trace.budget:
            drawn = self.agent.suggest(str(self.next_id))
            if drawn is None:  # the optimizer has nothing left to try (SMAC on a small, exhausted space)
                return
            if isinstance(drawn, Resume):
                self._resume(drawn.handle)
                continue
            handle, params = drawn
            self.next_id += 1
            key = config_key(params)
            if self.trains_nothing(params):  # every group frozen: not a trial (the table does not hold it)
                self.agent.fail(handle)
                misses += 1
                if misses > MAX_MISSES:
                    raise RuntimeError(f"{self.trace.strategy} drew {misses} configurations in a row that train "
                                       f"nothing")
                continue
            nth = self.drawn[key] = self.drawn.get(key, -1) + 1
            run = self.seeds.run(key, params, nth)
            self.running[self.next_id] = _Running(handle, key, run, self.now)
            self.trace.runs.append((key, run.seed, False))
            self._queue(self.next_id, 0)

    def _queue(self, i: int, k: int) -> None:
        r = self.running[i]
        seconds = r.run.checkpoints[k][2] if k < len(r.run.checkpoints) else r.run.device_seconds
        heapq.heappush(self.events, (r.start + (seconds - r.done) / self.cpus, i, k))

    def _pause(self, i: int) -> None:
        """The scheduler paused it: its slot and its spend stop until it is resumed."""
        r = self.running.pop(i)
        self.spent_closed += (self.now - r.start) * self.cpus
        self.paused[id(r.handle)] = (i, r)
        best = self.agent.best()
        self.trace.points.append((self.spend(self.now), best, best))

    def _resume(self, handle) -> None:
        i, r = self.paused.pop(id(handle))
        r.start, r.done = self.now, r.run.checkpoints[r.k][2]
        self.running[i] = r
        self._queue(i, r.k + 1)

    def _deliver(self, i: int, k: int) -> None:
        r = self.running[i]
        if k == len(r.run.checkpoints):
            r.step, r.last = r.run.steps, r.run.final
            self._close(i, completed=True)
            return
        step, value, _ = r.run.checkpoints[k]
        r.step, r.last, r.k = step, value, k
        decision = self.agent.report(r.handle, step, value)
        if decision == PAUSE:
            self._pause(i)
        elif decision:
            self._queue(i, k + 1)
        else:
            self._close(i, completed=False, stopped=True)

    def _close(self, i: int, completed: bool, stopped: bool = False) -> None:
        r = self.running.pop(i)
        self.spent_closed += (self.now - r.start) * self.cpus
        if completed:
            self.agent.complete(r.handle, r.step, r.last)
        elif stopped:
            self.agent.stopped(r.handle, r.step, r.last)
        else:
            self.agent.cut(r.handle, r.step, r.last)
        self.events = [e for e in self.events if e[1] != i]
        heapq.heapify(self.events)
        self.trace.trials += 1
        best = self.agent.best()
        self.trace.points.append((self.spend(self.now), best, best))


class _OptunaAgent:
    """An Optuna study driven by ask and tell, as a user of Optuna alone writes the loop."""

    def __init__(self, plan: dict, space, layers: int, table: Table, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = {None: optuna.pruners.NopPruner, "hyperband": optuna.pruners.HyperbandPruner,
                  "successive-halving": optuna.pruners.SuccessiveHalvingPruner}[plan["pruner"]]()
        # a fixed study name: HyperbandPruner picks a trial's bracket from a hash of it (a random name by default)
        self.study = optuna.create_study(study_name=f"peer-{seed}", direction="maximize", pruner=pruner,
                                         sampler=optuna.samplers.TPESampler(seed=seed))
        self.space, self.layers = space, layers

    def suggest(self, trial_id: str):
        trial = self.study.ask()
        return trial, self.space.sample(trial, self.layers)

    def report(self, trial, step: int, value: float) -> bool:
        trial.report(value, step)
        return not trial.should_prune()

    def complete(self, trial, step: int, value: float) -> None:
        self.study.tell(trial, value)

    def stopped(self, trial, step: int, value: float) -> None:
        from optuna.trial import TrialState

        self.study.tell(trial, state=TrialState.PRUNED)

    def cut(self, trial, step: int | None, value: float | None) -> None:  # killed at the deadline
        self.fail(trial)

    def fail(self, trial) -> None:
        from optuna.trial import TrialState

        self.study.tell(trial, state=TrialState.FAIL)

    def best(self) -> str | None:
        from optuna.trial import TrialState

        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return config_key(max(done, key=lambda t: t.value).params) if done else None


@dataclass
class _TuneTrial:
    trial_id: str
    config: dict


class _TuneAgent:
    """Ray Tune's searcher and scheduler objects, fed as Tune's controller feeds them."""

    def __init__(self, plan: dict, space, layers: int, table: Table, seed: int):
        from ray.tune.schedulers import ASHAScheduler, TrialScheduler

        first, steps = table.fidelity()
        self.scheduler = ASHAScheduler(time_attr="step", metric=METRIC, mode="max", max_t=steps, grace_period=first)
        self.stop = TrialScheduler.STOP
        self.space, self.layers = space, layers
        if plan["searcher"] == "tpe":
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.searcher = OptunaSearch(space=lambda trial: space.sample(trial, layers), metric=METRIC, mode="max",
                                         sampler=optuna.samplers.TPESampler(seed=seed))
        else:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.searcher = None  # Tune's random search: every dimension drawn uniformly, independently
            self.random = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        self.last: dict[str, float] = {}  # trial id -> its last result (what get_best_result(scope="last") reads)
        self.keys: dict[str, str] = {}

    def suggest(self, trial_id: str):
        if self.searcher is not None:
            config = self.searcher.suggest(trial_id)
        else:
            trial = self.random.ask()
            config = self.space.sample(trial, self.layers)
            self.random.tell(trial, 0.0)
        trial = _TuneTrial(trial_id, config)
        self.scheduler.on_trial_add(None, trial)
        self.keys[trial_id] = config_key(config)
        return trial, config

    def _result(self, step: int, value: float) -> dict:
        return {METRIC: value, "step": step, "training_iteration": step}

    def report(self, trial, step: int, value: float) -> bool:
        result = self._result(step, value)
        self.last[trial.trial_id] = value
        if self.searcher is not None:
            self.searcher.on_trial_result(trial.trial_id, result)
        return self.scheduler.on_trial_result(None, trial, result) != self.stop

    def complete(self, trial, step: int, value: float) -> None:
        result = self._result(step, value)
        self.last[trial.trial_id] = value
        self.scheduler.on_trial_complete(None, trial, result)
        if self.searcher is not None:
            self.searcher.on_trial_complete(trial.trial_id, result)

    def stopped(self, trial, step: int, value: float) -> None:
        """Tune's ``stop_trial`` of a running trial (its scheduler said stop, or the time budget ran out):
        the scheduler and the searcher see it complete with its last result."""
        self.complete(trial, step, value)

    def cut(self, trial, step: int | None, value: float | None) -> None:
        if value is None:  # no result yet: Tune tells the searcher nothing (OptunaSearch marks it pruned)
            self.scheduler.on_trial_remove(None, trial)
            if self.searcher is not None:
                self.searcher.on_trial_complete(trial.trial_id)
            return
        self.stopped(trial, step, value)

    def fail(self, trial) -> None:  # the trainable raised (a draw that trains nothing)
        self.scheduler.on_trial_remove(None, trial)
        if self.searcher is not None:
            self.searcher.on_trial_complete(trial.trial_id, None, error=True)

    def best(self) -> str | None:
        if not self.last:
            return None
        return self.keys[max(self.last, key=lambda i: self.last[i])]


__all__ = ["PAUSE", "PEERS", "PeerError", "Resume", "check_installed", "replay_peer"]
