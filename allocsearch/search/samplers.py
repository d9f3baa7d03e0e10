"""The Optuna samplers a study can use, as the controller needs them.

- ``tpe`` (default): multivariate, grouped, constant liar for parallel trials; ``nsga2`` for several
  objectives; ``random``; ``grid``: Optuna's ``BruteForceSampler`` over a finite space.
- On a finite space TPE's random start (its first ``STARTUP_TRIALS`` completed trials) draws **without
  replacement** (:class:`FreshStart`): Optuna's start draws each parameter uniformly and independently, so on
  the 7-placement known-answer spaces a live search of 5 trials drew r8/8/8 three times, and the grid, which
  never runs a configuration twice before it has run the rest, beat it there (``bench suite``).
- Trials that ran out of memory, and draws that freeze every layer (nothing to train), are infeasible
  (``user attr ``infeasible`` = 1``), and TPE and NSGA-II learn to stay away from configurations that
  cannot run: Optuna >= 5 reads each ended trial's
  constraint (:func:`record_feasibility`, what ``Trial.set_constraint`` writes; ``constraints_func`` is
  deprecated there); Optuna 4 gets the constraints function :func:`infeasibility`.
- The grid sampler calls ``Study.stop()`` when its grid is used up, which Optuna allows only inside
  ``Study.optimize`` (the controller uses ask / tell): here it only notes it; the controller ends the
  search when a sampled point repeats one that already ran (``grid_repeats``).
"""
from __future__ import annotations

import functools
import warnings

from allocsearch.study.records import Attr

SAMPLERS = ("tpe", "random", "nsga2", "grid")


def infeasibility(trial) -> list[float]:
    """Optuna constraints (> 0: violated): out of memory on the device it ran on."""
    return [float(trial.user_attrs.get(Attr.INFEASIBLE, 0.0))]


# the constraint's name: out of memory first, nothing to train since (one name, so resumed studies agree)
OUT_OF_MEMORY = "out_of_memory"


def reads_trial_constraints() -> bool:
    """Whether this Optuna's samplers read constraints stored on trials (>= 5) instead of a function."""
    import optuna

    return int(optuna.__version__.split(".")[0]) >= 5


def record_feasibility(store, number: int, infeasible: float) -> None:
    """Store an ending trial's constraint (> 0: infeasible) where Optuna >= 5 samplers read it (what
    ``Trial.set_constraint(OUT_OF_MEMORY, value)`` writes; ``store``: the study's ``TrialStore``). The
    controller tells trials by number (a resumed search has no live ``Trial``)."""
    if reads_trial_constraints():
        store.set_constraint(number, OUT_OF_MEMORY, infeasible)


def session_seed(seed: int, session: int) -> int:
    """The sampler's seed for one controller session of a study: ``seed`` for the first, another for each
    resume. With one seed for all, a resumed TPE replays its random start-up draws (and a random sampler
    its whole sequence), running configurations that already ran."""
    return seed if session == 0 else (seed * 1_000_003 + session * 7_919) % 2**32


STARTUP_TRIALS = 10  # TPE's random start: Optuna's default ``n_startup_trials``, stated so both phases agree


def make_sampler(name: str, seed: int, *, finite: bool = False):
    """The sampler ``name``; ``finite``: the space has a finite grid (``SearchSpace.grid_size`` is not None),
    where TPE's random start draws without replacement (:class:`FreshStart`)."""
    import optuna

    constraints = {} if reads_trial_constraints() else {"constraints_func": infeasibility}
    if name == "tpe":
        with warnings.catch_warnings():  # ``group`` is experimental in Optuna, and chosen on purpose here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            tpe = optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                             n_startup_trials=STARTUP_TRIALS, **constraints)
        return _fresh_start_class()(tpe, seed) if finite else tpe
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **constraints)
    if name == "grid":
        return _grid_sampler(seed)
    raise ValueError(f"unknown sampler {name!r}")


def sampler_for(name: str, seed: int, space, num_layers: int, *, fresh_start: bool = True):
    """The sampler a study of ``space`` runs (``allocsearch start`` and the replay alike): TPE's start draws
    without replacement where the space is finite, unless ``fresh_start`` is off (the replay's old start)."""
    return make_sampler(name, seed, finite=fresh_start and space.grid_size(num_layers) is not None)


@functools.cache
def _fresh_start_class():
    from optuna.samplers import BaseSampler
    from optuna.trial import TrialState

    class FreshStart(BaseSampler):
        """TPE whose random start never draws a configuration again while untried ones remain: until
        ``STARTUP_TRIALS`` trials have completed (or been pruned: what TPE counts), every parameter comes from
        Optuna's ``BruteForceSampler``, which walks the space's tree (method, then its parameters) choosing
        uniformly among the branches with an untried point and treating running trials as tried; after that,
        TPE itself, unchanged. Once every point has run the start-up draws repeat at random, as TPE's would.
        The choice is made once per trial, before its first draw, so a trial never mixes the two."""

        def __init__(self, tpe, seed: int):
            from optuna.samplers import BruteForceSampler

            import optuna

            self.tpe = tpe
            with warnings.catch_warnings():  # experimental in Optuna, and chosen on purpose here
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.start = BruteForceSampler(seed=seed)
            self._fresh: set[int] = set()  # numbers of the trials drawn without replacement
            self._over = False  # the start is over for good: completed and pruned trials only ever grow

        def starting(self, study) -> bool:
            if not self._over:
                done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                self._over = len(done) >= STARTUP_TRIALS
            return not self._over

        def before_trial(self, study, trial) -> None:
            if self.starting(study):
                self._fresh.add(trial.number)
            self.tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return {} if trial.number in self._fresh else self.tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return {} if trial.number in self._fresh else self.tpe.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            which = self.start if trial.number in self._fresh else self.tpe
            return which.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._fresh.discard(trial.number)
            self.tpe.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.tpe.reseed_rng()
            self.start.reseed_rng()

    return FreshStart


def __getattr__(name: str):
    if name == "FreshStart":  # defined on first use: Optuna stays out of ``import allocsearch``
        return _fresh_start_class()
    raise AttributeError(name)


def _grid_sampler(seed: int):
    from optuna.samplers import BruteForceSampler

    class GridSampler(BruteForceSampler):
        used_up = False

        def after_trial(self, study, trial, state, values) -> None:
            super().after_trial(_NoStop(study, self), trial, state, values)

    import optuna

    with warnings.catch_warnings():  # BruteForceSampler is experimental in Optuna, and chosen on purpose here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return GridSampler(seed=seed)


class _NoStop:
    """The study as the grid sampler sees it after a trial: ``stop()`` notes that the grid is used up."""

    def __init__(self, study, sampler):
        self._study, self._sampler = study, sampler

    def stop(self) -> None:
        self._sampler.used_up = True

    def __getattr__(self, name):
        return getattr(self._study, name)


def grid_repeats(study, trial) -> bool:
    """Whether ``trial``'s sampled point is one a trial already ran or runs (the grid has no new point)."""
    from optuna.trial import TrialState

    if Attr.RETRY_OF in trial.user_attrs:
        return False  # a point run again on purpose (a crash or out-of-memory retry)
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return any(t.number != trial.number and t.params == trial.params
               for t in study.get_trials(deepcopy=False, states=states))
