"""The confirmation phase: the budget's reserve (default 20%) re-runs the search's finalists on fresh seeds,
raced against the incumbent and paired by seed, until the best is separated or the reserve is spent.

Why: a search's argmax over single-seed scores is the luckiest draw among configurations whose true
difference is often inside seed noise (measured on the demo task: std 0.012 against a +0.0015 "win").
SMAC3's intensifier races challengers against the incumbent on (instance, seed) pairs; this is that race
for configurations that already ran once, inside the user's budget.

    finalists = the top ``finalists`` configurations by score, and any other within ``band x noise`` of
                the best (at most ``finalists`` more)
    each round: every surviving finalist runs once more on the next seed (1, 2, ...: the same seeds for
                all, so differences pair by seed), the fewest-seeds first, best mean first
    a finalist is dropped once the incumbent (the best mean) is separated from it, both run on >= 2 seeds
                (``allocsearch.study.confidence.separated``: a paired t-test, or the noise band)
    the race ends when one finalist is left, every finalist has ``max_seeds`` seeds, or the reserve is spent

Each run is its own trial, its user attrs ``confirm`` (the configuration's first trial) and ``seed``
(``TrialRecord.confirm_of`` and ``seed``). The
state is re-derived from the study's trials each time, so a resumed search goes on with the same race.
"""
from __future__ import annotations

from allocsearch.study.confidence import Estimate, estimates, noise_of, separated
from allocsearch.study.records import State

WAIT = "wait"
OUT_OF_BUDGET = "no finalist's next whole run fits in what is left of the budget"


class Confirmation:
    def __init__(self, *, max_seeds: int, finalists: int = 3, band: float = 2.0, noise: float | None = None):
        if finalists < 2 or max_seeds < 2:
            raise ValueError(f"finalists and max_seeds must be >= 2, not {finalists}, {max_seeds}")
        self.k, self.max_seeds, self.band, self.declared = int(finalists), int(max_seeds), float(band), noise
        self.alive: list[str] | None = None  # the finalists' keys still in the race
        self.dropped: set[str] = set()  # finalists the incumbent was separated from (they never come back)
        self.ended: str | None = None

    def noise(self, ests: list[Estimate]) -> float | None:
        return noise_of(ests, self.declared)

    def start(self, rows) -> list[Estimate]:
        """Choose the finalists from the study's rows (see ``confidence.estimates``); returns them. A
        resumed race keeps the configurations it had already re-run."""
        ests = estimates(rows)
        if not ests:
            self.alive, self.ended = [], "no configuration completed"
            return []
        finalists = self._finalists(rows, ests)
        self.alive = [e.key for e in finalists]
        if len(self.alive) < 2:
            self.ended = "only one configuration completed"
        return finalists

    def _finalists(self, rows, ests: list[Estimate]) -> list[Estimate]:
        """The top ``k``, any within ``band x noise`` of the best, and any configuration already re-run."""
        confirmed = {r.key for r in rows if r.confirm_of is not None and r.params}
        best, noise = ests[0], self.noise(ests)
        top = ests[:self.k]
        near = [e for e in ests[self.k:] if noise and best.mean - e.mean <= self.band * noise][:self.k]
        again = [e for e in ests if e.key in confirmed and e not in top and e not in near]
        return top + near + again

    def next(self, rows, running: set[tuple[str, int]], unaffordable: frozenset = frozenset()
             ) -> tuple[dict, int, int] | str | None:
        """The next run: (params, seed, the configuration's first trial); ``WAIT`` while the round's runs
        are still running; None when the race is over (``self.ended`` says why). ``unaffordable``: finalists
        whose next whole run the budget no longer pays for: the race goes on without them."""
        if self.alive is None:
            self.start(rows)
        if self.ended:
            return None
        ranked = estimates(rows)
        ests = {e.key: e for e in ranked}
        # a search trial still running when the phase began may end among the best: it joins the race (so
        # does one that climbs into the top as finalists' means fall), unless it was dropped before
        late = [e.key for e in self._finalists(rows, ranked) if e.key not in self.dropped] if ranked else []
        self.alive = list(dict.fromkeys(self.alive + late))
        alive = [ests[k] for k in self.alive if k in ests]
        noise = self.noise(list(ests.values()))
        incumbent = max(alive, key=lambda e: e.mean) if alive else None
        busy = {key for key, _ in running}
        # drop challengers the incumbent is separated from, once both have been re-run at least once (a
        # finalist's first, lucky or unlucky, run alone never decides) and their runs have come back
        self.alive = [e.key for e in alive if e is incumbent or e.key in busy or min(e.n, incumbent.n) < 2
                      or not separated(incumbent, e, noise)]
        self.dropped |= {e.key for e in alive} - set(self.alive)
        if len(self.alive) < 2:
            self.ended = "the best is separated from every other finalist"
            return None
        alive = [ests[k] for k in self.alive if k not in unaffordable]
        free = [e for e in alive if e.key not in busy and e.n < self.max_seeds]
        if not free:
            if busy:
                return WAIT
            self.ended = OUT_OF_BUDGET if unaffordable else f"every finalist ran on {self.max_seeds} seeds"
            return None
        fewest = min(e.n for e in alive)
        todo = [e for e in free if e.n == fewest]
        if not todo:
            return WAIT  # the round is not finished: runs of configurations with fewer seeds are running
        e = max(todo, key=lambda e: e.mean)
        # a seed whose confirmation run failed is not tried again; a configuration whose confirmation runs
        # failed twice leaves the race (a run the budget could not pay for did not fail)
        tried = {r.seed for r in rows if r.confirm_of is not None and r.params and r.key == e.key
                 and r.state not in (State.COMPLETED, State.NOT_RUN, *State.LIVE)}
        if len(tried) >= 2:
            self.alive.remove(e.key)
            self.dropped.add(e.key)
            return self.next(rows, running, unaffordable)
        seed = next(s for s in range(self.max_seeds + len(tried) + 1)
                    if s not in e.values and s not in tried and (e.key, s) not in running)
        return e.params, seed, e.first_trial()


RACE_RUNS = 1  # whole runs the reserve must be able to pay for to be held back


class Reserve:
    """The confirmation phase's share of the budget, and so the search's phase: ``search`` (the reserve held
    back from admission, ``BudgetKeeper.held``), ``confirm`` (the race spends it), or ``search, reserve
    released`` (given back to the search: nothing to race, or too small for RACE_RUNS whole runs)."""

    def __init__(self, keeper, race: Confirmation | None, amount: float, emit):
        self.keeper, self.race, self.emit, self.phase = keeper, race, emit, "search"
        keeper.held = amount if race else 0.0
        self.too_dear: dict[str, float] = {}  # finalists whose next whole run no longer fits -> what it needs

    def out_of_budget(self) -> str:
        """The numbers behind a race that ran out of budget ('' otherwise): what is free against what the
        cheapest finalist's next whole run needs (its predicted cost x the keeper's margin)."""
        if self.race is None or self.race.ended != OUT_OF_BUDGET or not self.too_dear:
            return ""
        fmt = self.keeper.budget.format
        return (f" ({fmt(self.keeper.free())} left; the cheapest finalist's next run needs about "
                f"{fmt(min(self.too_dear.values()))}, its predicted cost x {self.keeper.margin:g} margin: a "
                f"confirmation run cut short counts for nothing)")

    def begin(self, rows) -> bool:
        """The search phase is over: the reserve goes to the race, or, with nothing to race (fewer than two
        configurations completed), back to the search. True when there is budget to go on with."""
        if self.race is None or self.phase != "search":
            return False
        self.keeper.held = 0.0
        finalists = self.race.start(rows)
        self.phase = "search, reserve released" if self.race.ended else "confirm"
        self.emit("confirming", finalists=[{"params": e.params, "n": e.n, "mean": e.mean} for e in finalists],
                  ended=self.race.ended, reserve=self.keeper.free())
        return self.keeper.free() > 0

    def release_if_small(self, predicted: float) -> None:
        """A reserve too small for RACE_RUNS whole runs of ``predicted`` cost (the cost model's best guess:
        its prior until it has seen trials) goes to the search instead of being held back for nothing. Checked
        at every admission from the first: the trials admitted before it goes have their budget caps set
        without it, so waiting for measured costs cut them (measured on the replay at 10% of the grid: a
        trial stopped 1.3 s before its end by the held reserve, then released unused)."""
        if self.phase != "search" or not self.keeper.held:
            return
        need = RACE_RUNS * predicted * self.keeper.margin
        if self.keeper.held < need:
            # the budget whose reserve (the same share of it) would pay for the race's runs: what to tell the user
            needed = self.keeper.budget.seconds * need / self.keeper.held
            self.keeper.held, self.phase = 0.0, "search, reserve released"
            self.race.ended = f"the reserve cannot pay for {RACE_RUNS} whole confirmation run(s)"
            self.emit("confirming", finalists=[], ended=self.race.ended, reserve=0.0, needed_budget=needed)


def fresh_seed(rows, params: dict, number: int, default: int, max_seeds: int) -> int:
    """The seed of a trial the sampler drew: ``default``, unless the configuration already ran (TPE draws
    a finite space's points again): then its next seed not run yet, so the repeat measures seed noise
    instead of paying for the same number twice; once ``max_seeds`` ran, a plain repeat (it counts once)."""
    used = {r.seed for r in rows if r.params == params and r.number != number
            and r.state in (State.COMPLETED, State.PRUNED, State.RUNNING)}
    fresh = [s for s in range(default, default + max_seeds) if s not in used]
    return fresh[0] if fresh else default


__all__ = ["Confirmation", "OUT_OF_BUDGET", "RACE_RUNS", "Reserve", "WAIT", "fresh_seed"]
