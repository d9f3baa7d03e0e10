"""TPE's random start on a finite space draws without replacement (``samplers.FreshStart``): every configuration
once before any twice, running trials counted as tried, method branches included; TPE itself afterwards."""
from __future__ import annotations

import optuna
import pytest

from allocsearch.search.samplers import STARTUP_TRIALS, make_sampler
from allocsearch.search.space.space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
LAYERS = 4
# two methods with their own parameters (a conditional tree) and a shared learning rate: 2 x (3 + 2) = 10 points
SPACE = {
    "version": 1, "model": "tiny-llama", "priors": False,
    "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 16, "validation": 8, "test": 8}]},
    "train": {"steps": 8, "lr": {"choice": [1.0e-3, 3.0e-3]}},
    "methods": {"lora": {"rank": {"choice": [2, 4, 8]}}, "mola": {"experts": {"choice": [2, 4]}, "top_k": 1,
                                                                    "rank": 4}},
}
# the known-answer placement space: 3 groups each r8 or nothing, 8 points (one trains nothing)
PLACEMENT = {**SPACE, "train": {"steps": 8, "lr": 1.0e-3},
             "methods": {"lora": {"rank": {"groups": 3, "each": {"choice": [0, 8]}}}}}


def draws(space_dict: dict, sampler, n: int, *, tell: bool = True) -> list[str]:
    """The configurations (summaries) of ``n`` trials asked in turn; each told at once, or left running."""
    space = SearchSpace.from_dict(space_dict)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    out = []
    for i in range(n):
        trial = study.ask()
        params = space.sample(trial, LAYERS)
        out.append(space.summarize(params))
        if tell:
            study.tell(trial, 0.5 + 0.01 * i)
    return out


def test_make_sampler_wraps_tpe_only_on_a_finite_space():
    assert isinstance(make_sampler("tpe", 0), optuna.samplers.TPESampler)
    fresh = make_sampler("tpe", 0, finite=True)
    assert not isinstance(fresh, optuna.samplers.TPESampler) and isinstance(fresh.tpe, optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", 0, finite=True), optuna.samplers.RandomSampler)


@pytest.mark.parametrize("seed", range(5))
def test_the_start_draws_every_configuration_once_before_any_twice(seed):
    size = SearchSpace.from_dict(SPACE).grid_size(LAYERS)
    assert size == 10 == STARTUP_TRIALS  # the whole start fits the grid exactly
    got = draws(SPACE, make_sampler("tpe", seed, finite=True), size)
    assert len(set(got)) == size, got


def test_optunas_own_start_repeats_on_the_same_space():
    """What the wrapper fixes: Optuna's start draws every parameter independently, with replacement."""
    size = SearchSpace.from_dict(SPACE).grid_size(LAYERS)
    repeats = [size - len(set(draws(SPACE, make_sampler("tpe", seed), size))) for seed in range(5)]
    assert all(r > 0 for r in repeats), repeats  # 10 draws of 10 points without a repeat: p = 10!/10^10


@pytest.mark.parametrize("seed", range(3))
def test_running_trials_count_as_tried_and_the_placement_grid_is_walked(seed):
    """Trials asked but not yet told (running in parallel) are not drawn again; on the placement space the
    start runs all 8 points (the one that trains nothing included: the controller skips it) before a repeat."""
    got = draws(PLACEMENT, make_sampler("tpe", seed, finite=True), 8, tell=False)
    assert len(set(got)) == 8, got
    more = draws(PLACEMENT, make_sampler("tpe", seed, finite=True), 9)
    assert len(set(more[:8])) == 8 and more[8] in more[:8]  # a ninth start-up draw can only repeat


def test_after_the_start_tpe_samples_alone(monkeypatch):
    sampler = make_sampler("tpe", 0, finite=True)
    calls = []
    real = sampler.start.sample_independent
    monkeypatch.setattr(sampler.start, "sample_independent",
                        lambda study, trial, *a: calls.append(trial.number) or real(study, trial, *a))
    draws(SPACE, sampler, STARTUP_TRIALS + 5)
    assert sorted(set(calls)) == list(range(STARTUP_TRIALS))  # start-up trials only, each of them


def first_draws(trace, n: int) -> list[str]:
    """The configurations of a replay's first ``n`` search runs (confirmation runs left out)."""
    return [key for key, _, confirm in trace.runs if not confirm][:n]


def test_the_replayed_default_walks_a_finite_table_and_the_old_start_does_not(tmp_path):
    """The replay's default gets the start without replacement (as `allocsearch start` does: the same
    ``sampler_for``), its `default-optuna-start` strategy the old one, which repeats a placement within 7 runs."""
    from allocsearch.bench.replay import replay
    from tests.test_bench_placement import ka_table

    table = ka_table(tmp_path / "t", (0.0, 0.05, 0.0))
    budget = table.grid_seconds()  # room for every placement once, none cut by early stopping before 7 ran
    repeats = {}
    for strategy in ("default", "default-optuna-start"):
        repeats[strategy] = []
        for seed in range(4):
            drawn = first_draws(replay(table, strategy, budget_seconds=budget, seed=seed), 7)
            repeats[strategy].append(len(drawn) - len(set(drawn)))
    assert repeats["default"] == [0, 0, 0, 0], repeats
    assert sum(repeats["default-optuna-start"]) > 0, repeats


def test_allocsearch_start_runs_the_fresh_start_on_a_finite_space_only(tmp_path, monkeypatch):
    """The session hands the controller the sampler ``sampler_for`` picks: FreshStart on a finite space, plain
    TPE where the learning rate is a float range (Ray is not started: the executor is replaced)."""
    import yaml

    from allocsearch.search import samplers
    from allocsearch.search.ray import executor
    from allocsearch.search.session import StartOptions, run

    seen = []
    monkeypatch.setattr(executor, "run", lambda controller, **kw: seen.append(controller.sampler))
    for name, lr in (("finite", 1.0e-3), ("float", {"float": [1.0e-4, 1.0e-3], "log": True})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**SPACE, "train": {"steps": 4, "lr": lr}}))
        run(StartOptions(budget="1cpu-min", space=str(path), study=name, workdir=str(tmp_path / "runs"),
                         mlflow=False))
    assert isinstance(seen[0], samplers.FreshStart) and isinstance(seen[1], optuna.samplers.TPESampler)
