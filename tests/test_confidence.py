"""Winners you can trust: the noise-aware rungs (against Tune's own ASHA bracket), the statistics of
repeated configurations (mean, CI, ties, the winner) and the confirmation race."""
from __future__ import annotations

import random
import statistics

import pytest

from allocsearch.confidence import (Estimate, config_key, estimates, evidence, pooled_noise, raced, separated, t95,
                                    winner, winner_of)
from allocsearch.search.confirmation import WAIT, Confirmation
from allocsearch.search.rungs import Rungs


# ------------------------------------------------------------------------------------------ rungs
@pytest.mark.parametrize("max_t,grace", [(100, 25), (150, 50), (8, 2), (300, 75)])
def test_rungs_with_no_margin_decide_as_tunes_asha_bracket(max_t, grace):
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class T:
        def __init__(self, i):
            self.trial_id = str(i)

    rng = random.Random(max_t)
    tune, ours = _Bracket(grace, max_t, 2, 0), Rungs(max_t, grace, 2, 0.0)
    decisions = 0
    for i in range(40):
        trial = T(i)
        for step in range(grace, max_t, grace):
            value = rng.random()
            stop_tune = tune.on_result(trial, step, value) == TrialScheduler.STOP
            assert ours.stop(trial.trial_id, step, value) == stop_tune
            decisions += stop_tune
            if stop_tune:
                break
    assert decisions > 5  # the comparison saw stops, not only continues


def test_a_checkpoint_within_the_margin_of_the_cutoff_is_not_stopped():
    plain, aware = Rungs(100, 25, 2, 0.0), Rungs(100, 25, 2, 0.02)
    for key, value in (("a", 0.80), ("b", 0.82)):
        assert not plain.stop(key, 25, value) and not aware.stop(key, 25, value)
    # the cutoff is the median of 0.80 and 0.82 = 0.81: 0.795 is below it, but within 0.02
    assert plain.stop("c", 25, 0.795) is True
    assert aware.stop("c", 25, 0.795) is False
    assert aware.stop("d", 25, 0.70) is True  # far below: stopped all the same
    with pytest.raises(ValueError):
        Rungs(100, 25, 2, -0.1)


# ------------------------------------------------------------------------------------------ statistics
def rows_of(table: dict[str, dict[int, float]]):
    """{config name: {seed: value}} -> study rows, trial numbers in order."""
    out, n = [], 0
    for name, by_seed in table.items():
        for seed, value in by_seed.items():
            out.append({"number": n, "state": "completed", "objective": value, "params": {"c": name}, "seed": seed})
            n += 1
    return out


def test_estimates_group_by_configuration_and_a_repeated_seed_counts_once():
    rows = rows_of({"a": {0: 0.80, 1: 0.84}, "b": {0: 0.86}})
    rows.append({"number": 9, "state": "completed", "objective": 0.99, "params": {"c": "a"}, "seed": 1})
    rows.append({"number": 10, "state": "pruned", "objective": 0.99, "params": {"c": "b"}, "seed": 1})
    ests = {e.params["c"]: e for e in estimates(rows)}
    assert ests["a"].n == 2 and ests["a"].mean == pytest.approx(0.82) and ests["a"].trials == {0: 0, 1: 1}
    assert ests["b"].n == 1 and ests["b"].std is None
    assert ests["a"].half_width() == pytest.approx(t95(1) * statistics.stdev([0.8, 0.84]) / 2 ** 0.5)
    assert ests["b"].half_width(noise=0.01) == pytest.approx(0.0196) and ests["b"].half_width() is None
    assert config_key({"y": 1, "x": 2}) == config_key({"x": 2, "y": 1})


def test_the_winner_is_the_best_mean_of_the_race():
    rows = rows_of({"a": {0: 0.85, 1: 0.84, 2: 0.86}, "b": {0: 0.90}, "c": {0: 0.83, 1: 0.82, 2: 0.80}})
    for r in rows:
        r["confirm"] = 0 if r["seed"] else None  # a and c were raced (their seeds 1, 2 are confirmation runs)
    # b's single run (0.90, drawn after the race, e.g. on a resume) does not beat a, confirmed on three seeds
    assert winner_of(rows).params == {"c": "a"} and raced(rows) == {config_key({"c": "a"}), config_key({"c": "c"})}
    # before any race, repeats from a sampler's re-draws do not crown the most-drawn: the best mean wins
    drawn = rows_of({"a": {0: 0.80, 1: 0.79, 2: 0.81}, "b": {0: 0.84}})
    assert winner_of(drawn).params == {"c": "b"}
    assert winner(estimates(rows_of({"a": {0: 0.85}, "b": {0: 0.90}}))).params == {"c": "b"}  # no repeats: argmax
    assert winner([]) is None


def test_ties_paired_by_seed_and_by_the_noise_band():
    # paired: b is always 0.01 worse than a on the same seed although the seeds swing by 0.05
    a = Estimate("a", {}, {0: 0.80, 1: 0.85, 2: 0.90, 3: 0.83})
    b = Estimate("b", {}, {s: v - 0.01 for s, v in a.values.items()})
    assert separated(a, b, noise=0.05)
    # unpaired: the same means, one run each, are not separated by a noise of 0.02 but are by 0.001
    one, two = Estimate("1", {}, {0: 0.85}), Estimate("2", {}, {0: 0.83})
    assert not separated(one, two, noise=0.02) and separated(one, two, noise=0.001)
    assert not separated(one, two, noise=None)  # no noise estimate: nothing is separated
    assert pooled_noise([a, b, one]) == pytest.approx(statistics.stdev(a.values.values()))


def test_evidence_names_the_finalists_and_the_ties():
    rows = rows_of({"a": {0: 0.85, 1: 0.86, 2: 0.84}, "b": {0: 0.845, 1: 0.855, 2: 0.845},
                    "c": {0: 0.70, 1: 0.71, 2: 0.69}, "d": {0: 0.84}})
    ev = evidence(rows)
    assert ev["winner"]["params"] == {"c": "a"} and ev["winner"]["n"] == 3
    assert ev["noise"] == pytest.approx(pooled_noise(estimates(rows)))
    tied = {tuple(t["params"].values()) for t in ev["tied"]}
    assert ("b",) in tied and ("c",) not in tied and ("d",) in tied
    assert ev["finalists"][0]["tied"] is False and ev["configurations"] == 4


# ------------------------------------------------------------------------------------------ the race
def race(truth: dict[str, float], noise: float, first: dict[str, float], max_seeds=5, finalists=3, seed=0):
    """Run a confirmation race to its end on a simulated truth; returns (confirmation, rows)."""
    rng = random.Random(seed)
    rows = rows_of({k: {0: v} for k, v in first.items()})
    conf = Confirmation(finalists=finalists, max_seeds=max_seeds, noise=noise)
    conf.start(rows)
    for _ in range(100):
        plan = conf.next(rows, set())
        if plan is None:
            return conf, rows
        assert plan != WAIT
        params, seed_, first_trial = plan
        assert seed_ not in {r["seed"] for r in rows if r["params"] == params}  # a fresh seed
        rows.append({"number": len(rows), "state": "completed", "params": params, "seed": seed_, "confirm": first_trial,
                     "objective": truth[params["c"]] + rng.gauss(0, noise)})
    raise AssertionError("the race did not end")


def test_the_race_separates_a_clearly_better_configuration_early():
    truth = {"a": 0.90, "b": 0.80, "c": 0.79, "d": 0.60}
    conf, rows = race(truth, 0.005, first={"a": 0.90, "b": 0.80, "c": 0.79, "d": 0.60})
    assert conf.ended == "the best is separated from every other finalist"
    assert winner_of(rows).params == {"c": "a"}
    assert not any(r["params"] == {"c": "d"} and r.get("confirm") is not None for r in rows)  # not a finalist
    assert len(rows) - 4 <= 6  # a few runs, not max_seeds for everyone


def test_the_race_finds_the_true_best_behind_a_lucky_seed():
    # c's first run was lucky (0.88) but its truth is 0.80; a is truly the best
    truth = {"a": 0.86, "b": 0.84, "c": 0.80}
    conf, rows = race(truth, 0.01, first={"a": 0.85, "b": 0.84, "c": 0.88}, max_seeds=6)
    assert winner_of(rows).params == {"c": "a"}
    assert conf.ended is not None


def test_the_race_waits_for_its_round_and_skips_a_failing_seed():
    rows = rows_of({"a": {0: 0.85}, "b": {0: 0.84}})
    conf = Confirmation(finalists=2, max_seeds=4, noise=0.01)
    params, seed, first = conf.next(rows, set())
    assert params == {"c": "a"} and seed == 1 and first == 0
    running = {(config_key(params), seed)}
    params2, seed2, _ = conf.next(rows, running)
    assert params2 == {"c": "b"} and seed2 == 1
    assert conf.next(rows, running | {(config_key(params2), seed2)}) == WAIT  # the round is running
    rows.append({"number": 5, "state": "failed", "objective": None, "params": {"c": "a"}, "seed": 1, "confirm": 0})
    params3, seed3, _ = conf.next(rows, {(config_key(params2), seed2)})
    assert params3 == {"c": "a"} and seed3 == 2  # seed 1 failed for a: not tried again
    with pytest.raises(ValueError):
        Confirmation(finalists=1)


def test_one_completed_configuration_has_nothing_to_race():
    conf = Confirmation(noise=0.01)
    assert conf.next(rows_of({"a": {0: 0.8}}), set()) is None and conf.ended == "only one configuration completed"


def test_repeats_the_search_pruned_do_not_count_as_failed_confirmation_runs():
    # b was drawn again twice in the search phase (seeds 1, 2) and ASHA stopped both: not failures of the race
    rows = rows_of({"a": {0: 0.85}, "b": {0: 0.84}})
    rows += [{"number": 10 + s, "state": "pruned", "objective": 0.7, "params": {"c": "b"}, "seed": s} for s in (1, 2)]
    conf = Confirmation(finalists=2, max_seeds=5, noise=0.01)
    first = conf.next(rows, set())
    assert first[0] == {"c": "a"} and first[1] == 1
    second = conf.next(rows, {(config_key(first[0]), first[1])})
    # b stays in the race and re-runs in full on seed 1, paired with a's seed 1 (its pruned run there was partial)
    assert second not in (None, WAIT) and second[0] == {"c": "b"} and second[1] == 1
    # two failed confirmation runs do drop a finalist
    rows += [{"number": 20 + s, "state": "failed", "objective": None, "params": {"c": "b"}, "seed": s, "confirm": 1}
             for s in (3, 4)]
    conf = Confirmation(finalists=2, max_seeds=5, noise=0.01)
    assert conf.next(rows, {(config_key({"c": "a"}), 1)}) is None  # b's turn: it leaves, a is left alone
    assert config_key({"c": "b"}) not in conf.alive and conf.ended
