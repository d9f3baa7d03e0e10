"""The recorded tables shipped in benchmarks/ stay replayable as the code moves on: each loads (every
configuration on every seed), its card agrees with its rows, its space.yaml is still a valid space whose
grid is exactly the table's configurations, and the default strategy replays on it and exports one of them.
A change to the space parser, the controller or the table format that would make the README's benchmark
numbers impossible to re-run turns this red."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from allocsearch.bench.replay import replay
from allocsearch.bench.table import Table
from allocsearch.study.confidence import config_key
from allocsearch.search.space.space import SearchSpace, model_depth

ROOT = Path(__file__).resolve().parent.parent / "benchmarks"
TABLES = sorted(p.parent for p in ROOT.glob("*/table.csv"))


@pytest.fixture(scope="module", params=TABLES or [None], ids=[p.name for p in TABLES] or ["none"])
def table(request):
    assert request.param is not None, f"no benchmarks/*/table.csv under {ROOT}"  # never an empty, green module
    return request.param, Table.load(request.param)


def test_the_card_describes_the_rows(table):
    folder, t = table
    card = t.card
    assert card["name"] == folder.name and card.get("complete") is True
    assert card["seeds"] == t.seeds and len(t.seeds) >= 3  # the issue: every point on >= 3 seeds
    assert card["configurations"] == len(t.runs) and card["runs"] == len(t.runs) * len(t.seeds)
    for by in t.runs.values():
        for run in by.values():  # every run whole, its checkpoints in order and paid for
            assert run.final is not None and run.test is not None and run.checkpoints
            steps = [c[0] for c in run.checkpoints]
            assert steps == sorted(steps) and steps[-1] <= run.steps
            assert 0 < run.checkpoints[-1][2] <= run.device_seconds


def test_the_space_is_still_valid_and_its_grid_is_the_tables_configurations(table):
    _, t = table
    space = SearchSpace.from_dict(t.space, source="table")
    layers = t.num_layers  # the card's: a known-answer table's model folder lives where it was recorded
    if Path(space.model).is_absolute() and Path(space.model).is_dir():
        assert model_depth(space.model) == layers
    assert space.grid_size(layers) == len(t.runs)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(40 * len(t.runs)):  # every configuration the space can draw is one the table holds
        trial = study.ask()
        params = space.sample(trial, layers)
        if not space.trains_nothing(params, layers):  # a draw that freezes every group is never run
            drawn.add(config_key(params))
        study.tell(trial, 0.0)
        if len(drawn) == len(t.runs):
            break
    assert drawn == set(t.runs)


def test_the_default_replays_on_it_within_its_budget(table):
    _, t = table
    # half the grid: on a 7-placement table a quarter pays for about one whole prior (r8 everywhere, its dearest)
    trace = replay(t, "default", budget_seconds=0.5 * t.grid_seconds(), seed=0, max_concurrent=2)
    assert trace.final in t.runs and trace.trials >= 2
    assert trace.spent <= 0.5 * t.grid_seconds() * 1.01


def test_priors_only_runs_exactly_the_papers_settings(table):
    """On a recorded table with priors (4-5 paper settings on the demo tables; on a placement space only LoRA r8,
    as r8 in every group or the even split): priors-only runs each prior once, whole, in order, nothing else,
    and exports the one whose recorded run scored best."""
    _, t = table
    space = SearchSpace.from_dict(t.space)
    priors = [config_key(params) for _, params in space.priors(t.num_layers)]
    trace = replay(t, "priors-only", budget_seconds=t.grid_seconds(), seed=0)
    if not space.use_priors:  # a known-answer placement space (priors: false): nothing to run, nothing exported
        assert priors == [] and trace.trials == 0 and trace.final is None
        return
    assert trace.end_reason == "every prior has run" and len(priors) >= 1
    assert [key for key, _, _ in trace.runs] == priors and trace.trials == len(priors)
    scores = {key: t.runs[key][seed].final for key, seed, _ in trace.runs}
    assert trace.final == max(priors, key=lambda key: scores[key])

