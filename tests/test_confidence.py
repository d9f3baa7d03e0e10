"""Winners you can trust: the noise-aware rungs (against Tune's own ASHA bracket), the statistics of
repeated configurations (mean, CI, ties, the winner) and the confirmation race."""
from __future__ import annotations

import math
import random
import statistics

import pytest

from allocsearch.study.confidence import (MIN_POOLED, MIN_SPREAD, Estimate, config_key, estimates, evidence, finalist_mark, noise_of, pooled_noise, raced,
                                    separated, spread_bound, t95, winner, winner_of)
from allocsearch.study.choice import best_of
from allocsearch.study.records import TrialRecord
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


def test_spearman_matches_scipys_with_ties():
    from scipy.stats import spearmanr

    from allocsearch.search.rungs import spearman

    rng = random.Random(1)
    for _ in range(30):
        pairs = [(rng.choice([0.5, 0.6, 0.7, rng.random()]), rng.random()) for _ in range(rng.randint(3, 12))]
        assert spearman(pairs) == pytest.approx(spearmanr(*zip(*pairs)).correlation)
    assert spearman([(0.5, 0.8), (0.5, 0.9), (0.5, 0.7)]) is None  # a rung where every trial ties says nothing


def test_a_rung_stops_trials_only_once_it_has_ranked_completed_trials_as_their_ends():
    def fill(rungs, finals_of_rung):
        for rung_value, final in finals_of_rung:
            key = f"done{len(rungs.finals)}"
            assert not rungs.stop(key, 25, rung_value)  # untrusted: recorded, never stopped
            rungs.final(key, final)

    # slow starters: the step-25 scores run against the final ones (the SST-2 table's lr 1e-3 at chance)
    against = Rungs(100, 25, 2, 0.0, min_pairs=5)
    fill(against, [(0.50, 0.83), (0.50, 0.82), (0.72, 0.78), (0.75, 0.74), (0.78, 0.70), (0.74, 0.76)])
    assert not against.trusted(25) and against.stop("new", 25, 0.40) is False
    # an early score that predicts the end: trusted after 5 completed trials, then ASHA's rule with its margin
    agrees = Rungs(100, 25, 2, 0.0, min_pairs=5)
    fill(agrees, [(0.60, 0.70), (0.65, 0.74), (0.70, 0.78), (0.75, 0.80)])
    assert not agrees.trusted(25) and agrees.stop("early", 25, 0.40) is False  # only 4 pairs: not yet
    fill(agrees, [(0.62, 0.71)])
    assert agrees.trusted(25) and agrees.stop("late", 25, 0.40) is True
    # min_pairs 0 is Tune's ASHA: every rung trusted from the start
    assert Rungs(100, 25, 2, 0.0).trusted(25)


def test_tunes_face_of_the_rungs_learns_the_final_scores():
    from allocsearch.search.ray.executor import RungScheduler

    class T:
        def __init__(self, i):
            self.trial_id, self.config = str(i), {"number": i, "confirm": False}

    sched = RungScheduler(Rungs(100, 25, 2, 0.0, min_pairs=2))
    sched.on_trial_result(None, T(0), {"step": 25, "objective": 0.6})
    sched.on_trial_result(None, T(0), {"step": 100, "objective": 0.8, "final": True, "status": "completed"})
    sched.on_trial_result(None, T(1), {"step": 100, "objective": 0.1, "final": True, "status": "stopped"})
    assert sched.rungs.finals == {"0": 0.8}  # a trial cut short has no final score to learn from


# ------------------------------------------------------------------------------------------ statistics
def recs(rows) -> list[TrialRecord]:
    """The study's records of rows written as dicts (``confirm``: the trial a confirmation run confirms)."""
    return [TrialRecord(**{"confirm_of" if k == "confirm" else k: v for k, v in r.items()}) for r in rows]


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
    ests = {e.params["c"]: e for e in estimates(recs(rows))}
    assert ests["a"].n == 2 and ests["a"].mean == pytest.approx(0.82) and ests["a"].trials == {0: 0, 1: 1}
    assert ests["b"].n == 1 and ests["b"].std is None
    assert ests["a"].half_width() == pytest.approx(t95(1) * statistics.stdev([0.8, 0.84]) / 2 ** 0.5)
    assert ests["b"].half_width(noise=0.01) == pytest.approx(0.0196) and ests["b"].half_width() is None
    assert config_key({"y": 1, "x": 2}) == config_key({"x": 2, "y": 1})


def test_the_winner_is_the_best_mean_of_the_race():
    rows = rows_of({"a": {0: 0.85, 1: 0.84, 2: 0.86}, "b": {0: 0.87}, "c": {0: 0.83, 1: 0.82, 2: 0.80}})
    for r in rows:
        r["confirm"] = 0 if r["seed"] else None  # a and c were raced (their seeds 1, 2 are confirmation runs)
    # b's single run (0.87, drawn after the race, e.g. on a resume) is within the noise (0.015, pooled from a
    # and c) of a, confirmed on three seeds: it does not beat a
    assert winner_of(recs(rows)).params == {"c": "a"} and raced(recs(rows)) == {config_key({"c": "a"}), config_key({"c": "c"})}
    # a single run beyond the noise of every raced configuration (0.90: 3.3 noise above a) is better, run once
    rows[3]["objective"] = 0.90
    assert winner_of(recs(rows)).params == {"c": "b"}
    # before any race, repeats from a sampler's re-draws do not crown the most-drawn: the best mean wins
    drawn = rows_of({"a": {0: 0.80, 1: 0.79, 2: 0.81}, "b": {0: 0.84}})
    assert winner_of(recs(drawn)).params == {"c": "b"}
    assert winner(estimates(recs(rows_of({"a": {0: 0.85}, "b": {0: 0.90}})))).params == {"c": "b"}  # no repeats: argmax
    assert winner([]) is None


def test_a_finalist_whose_new_seed_diverged_is_not_crowned_by_its_race():
    # the race could pay for one run: its first finalist's new seed diverged (0.833 then 0.50, mean 0.667)
    rows = rows_of({"r4": {2: 0.833, 1: 0.50}, "r8": {0: 0.838}, "mola": {0: 0.82}})
    rows[1]["confirm"] = 0
    assert raced(recs(rows)) == {config_key({"c": "r4"})}
    assert winner_of(recs(rows), noise=0.0123).params == {"c": "r8"}  # worse than the best beyond noise: not the winner
    assert best_of(recs(rows), noise=0.0123).trial == 2
    # a finalist the race confirmed within noise of a single lucky run keeps the crown
    rows = rows_of({"r4": {2: 0.833, 1: 0.826}, "r8": {0: 0.845}})
    rows[1]["confirm"] = 0
    assert winner_of(recs(rows), noise=0.0123).params == {"c": "r4"}
    # and evidence names the same winner as best_of (one truth for status, export and MLflow)
    rows = rows_of({"r4": {2: 0.833, 1: 0.50}, "r8": {0: 0.838, 1: 0.83}, "mola": {0: 0.82}})
    rows[1]["confirm"] = 0
    assert evidence(recs(rows), 0.0123)["winner"]["trials"] == [2, 3] == sorted(winner_of(recs(rows), 0.0123).trials.values())


def test_a_declared_noise_holds_until_three_configurations_were_repeated():
    one = [Estimate("d", {}, {0: 0.833, 1: 0.50}), Estimate("s", {}, {0: 0.84})]
    assert noise_of(one, 0.0123) == 0.0123 and noise_of(one) == pytest.approx(pooled_noise(one))
    steady = [Estimate(str(i), {}, {0: 0.82, 1: 0.83}) for i in range(MIN_POOLED)]
    assert noise_of(one + steady, 0.0123) == pytest.approx(pooled_noise(one + steady))


def test_without_a_declared_noise_the_spread_of_all_scores_caps_the_noise_of_few_repeats():
    # as a live search without --noise: the one re-run configuration diverged on its new seed
    table = {"r4": {2: 0.833, 1: 0.50}, "r8": {0: 0.838}, "m1": {0: 0.82}, "m2": {0: 0.81}, "m3": {0: 0.825},
             "m4": {0: 0.80}}
    rows = rows_of(table)
    rows[1]["confirm"] = 0
    ests = estimates(recs(rows))
    assert pooled_noise(ests) > 0.2  # the diverged finalist's own spread
    assert spread_bound(ests) == pytest.approx(1.4826 * 0.0125)  # the median absolute deviation of the means
    assert noise_of(ests) == pytest.approx(spread_bound(ests)) and noise_of(ests, 0.05) == 0.05
    assert winner_of(recs(rows)).params == {"c": "r8"}
    # fewer configurations than MIN_SPREAD: no bound, and nothing tells the diverged seed from noise
    few = rows_of({k: table[k] for k in list(table)[:MIN_SPREAD - 1]})
    few[1]["confirm"] = 0
    assert spread_bound(estimates(recs(few))) is None and winner_of(recs(few)).params == {"c": "r4"}
    # once MIN_POOLED configurations were repeated the pooled noise stands on its own
    steady = [Estimate(str(i), {}, {0: 0.82, 1: 0.83 + 0.01 * i}) for i in range(MIN_POOLED)]
    assert noise_of(ests + steady) == pytest.approx(pooled_noise(ests + steady))


def test_ties_paired_by_seed_and_by_the_noise_band():
    # paired: b is always 0.01 worse than a on the same seed although the seeds swing by 0.05
    a = Estimate("a", {}, {0: 0.80, 1: 0.85, 2: 0.90, 3: 0.83})
    b = Estimate("b", {}, {s: v - 0.01 for s, v in a.values.items()})
    assert separated(a, b, noise=0.05)
    # unpaired: the same means, one run each, are not separated by a noise of 0.02 but are by 0.001
    one, two = Estimate("1", {}, {0: 0.85}), Estimate("2", {}, {0: 0.83})
    assert not separated(one, two, noise=0.02) and separated(one, two, noise=0.001)
    assert not separated(one, two, noise=None)  # no noise estimate: nothing is separated
    # a and b share their spread: the noise is that spread made median-unbiased (median chi^2_3 / 3 = 0.7887)
    assert pooled_noise([a, b, one]) == pytest.approx(statistics.stdev(a.values.values()) / 0.7887 ** 0.5, rel=2e-3)


def test_one_diverged_configuration_does_not_set_everyone_s_noise():
    import random

    rng = random.Random(0)
    steady = [Estimate(str(i), {}, {s: 0.82 + rng.gauss(0, 0.012) for s in range(3)}) for i in range(12)]
    diverged = [Estimate(f"d{i}", {}, {0: 0.82, 1: 0.50, 2: 0.81}) for i in range(2)]
    robust, steady_only = pooled_noise(steady + diverged), pooled_noise(steady)
    textbook = (statistics.fmean([e.std ** 2 for e in steady + diverged])) ** 0.5
    assert abs(robust - 0.012) < 0.006 and abs(robust - steady_only) < 0.004  # the 12 steady ones decide
    assert textbook > 4 * robust  # the df-weighted mean of variances is what the median avoids
    # the estimator is median-unbiased for normal noise: over many draws half land below sigma
    below = sum(pooled_noise([Estimate("x", {}, {s: rng.gauss(0, 1) for s in range(3)})]) < 1 for _ in range(4000))
    assert 0.46 < below / 4000 < 0.54


def test_evidence_names_the_finalists_and_the_ties():
    rows = rows_of({"a": {0: 0.85, 1: 0.86, 2: 0.84}, "b": {0: 0.845, 1: 0.855, 2: 0.845},
                    "c": {0: 0.70, 1: 0.71, 2: 0.69}, "d": {0: 0.84}})
    ev = evidence(recs(rows))
    assert ev["winner"]["params"] == {"c": "a"} and ev["winner"]["n"] == 3
    assert ev["noise"] == pytest.approx(pooled_noise(estimates(recs(rows))))
    tied = {tuple(t["params"].values()) for t in ev["tied"]}
    assert ("b",) in tied and ("c",) not in tied and ("d",) in tied
    assert ev["finalists"][0]["tied"] is False and ev["configurations"] == 4


# ------------------------------------------------------------------------------------------ the race
def race(truth: dict[str, float], noise: float, first: dict[str, float], max_seeds=5, finalists=3, seed=0):
    """Run a confirmation race to its end on a simulated truth; returns (confirmation, rows)."""
    rng = random.Random(seed)
    rows = rows_of({k: {0: v} for k, v in first.items()})
    conf = Confirmation(finalists=finalists, max_seeds=max_seeds, noise=noise)
    conf.start(recs(rows))
    for _ in range(100):
        plan = conf.next(recs(rows), set())
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
    assert winner_of(recs(rows)).params == {"c": "a"}
    assert not any(r["params"] == {"c": "d"} and r.get("confirm") is not None for r in rows)  # not a finalist
    assert len(rows) - 4 <= 6  # a few runs, not max_seeds for everyone


def test_the_race_finds_the_true_best_behind_a_lucky_seed():
    # c's first run was lucky (0.88) but its truth is 0.80; a is truly the best
    truth = {"a": 0.86, "b": 0.84, "c": 0.80}
    conf, rows = race(truth, 0.01, first={"a": 0.85, "b": 0.84, "c": 0.88}, max_seeds=6)
    assert winner_of(recs(rows)).params == {"c": "a"}
    assert conf.ended is not None


def test_the_race_waits_for_its_round_and_skips_a_failing_seed():
    rows = rows_of({"a": {0: 0.85}, "b": {0: 0.84}})
    conf = Confirmation(finalists=2, max_seeds=4, noise=0.01)
    params, seed, first = conf.next(recs(rows), set())
    assert params == {"c": "a"} and seed == 1 and first == 0
    running = {(config_key(params), seed)}
    params2, seed2, _ = conf.next(recs(rows), running)
    assert params2 == {"c": "b"} and seed2 == 1
    assert conf.next(recs(rows), running | {(config_key(params2), seed2)}) == WAIT  # the round is running
    rows.append({"number": 5, "state": "failed", "objective": None, "params": {"c": "a"}, "seed": 1, "confirm": 0})
    params3, seed3, _ = conf.next(recs(rows), {(config_key(params2), seed2)})
    assert params3 == {"c": "a"} and seed3 == 2  # seed 1 failed for a: not tried again
    with pytest.raises(ValueError):
        Confirmation(finalists=1, max_seeds=5)


def test_one_completed_configuration_has_nothing_to_race():
    conf = Confirmation(max_seeds=5, noise=0.01)
    assert conf.next(recs(rows_of({"a": {0: 0.8}})), set()) is None and conf.ended == "only one configuration completed"


def test_repeats_the_search_pruned_do_not_count_as_failed_confirmation_runs():
    # b was drawn again twice in the search phase (seeds 1, 2) and ASHA stopped both: not failures of the race
    rows = rows_of({"a": {0: 0.85}, "b": {0: 0.84}})
    rows += [{"number": 10 + s, "state": "pruned", "objective": 0.7, "params": {"c": "b"}, "seed": s} for s in (1, 2)]
    conf = Confirmation(finalists=2, max_seeds=5, noise=0.01)
    first = conf.next(recs(rows), set())
    assert first[0] == {"c": "a"} and first[1] == 1
    second = conf.next(recs(rows), {(config_key(first[0]), first[1])})
    # b stays in the race and re-runs in full on seed 1, paired with a's seed 1 (its pruned run there was partial)
    assert second not in (None, WAIT) and second[0] == {"c": "b"} and second[1] == 1
    # two failed confirmation runs do drop a finalist
    rows += [{"number": 20 + s, "state": "failed", "objective": None, "params": {"c": "b"}, "seed": s, "confirm": 1}
             for s in (3, 4)]
    conf = Confirmation(finalists=2, max_seeds=5, noise=0.01)
    assert conf.next(recs(rows), {(config_key({"c": "a"}), 1)}) is None  # b's turn: it leaves, a is left alone
    assert config_key({"c": "b"}) not in conf.alive and conf.ended


def test_a_search_trial_that_ends_after_the_race_began_joins_it():
    # the phase began while c was still running; c then ends as the best: it is raced, not passed over
    rows = rows_of({"a": {0: 0.85}, "b": {0: 0.84}})
    conf = Confirmation(finalists=2, max_seeds=4, noise=0.01)
    assert [e.params["c"] for e in conf.start(recs(rows))] == ["a", "b"]
    rows.append({"number": 7, "state": "completed", "objective": 0.87, "params": {"c": "c"}, "seed": 0})
    params, seed, first = conf.next(recs(rows), set())
    assert params == {"c": "c"} and seed == 1 and first == 7 and config_key({"c": "c"}) in conf.alive
    # a finalist the incumbent was separated from does not come back when it would rank again
    conf.dropped.add(config_key({"c": "b"}))
    conf.alive.remove(config_key({"c": "b"}))
    conf.next(recs(rows), {(config_key(params), seed)})
    assert config_key({"c": "b"}) not in conf.alive


def test_a_configuration_stopped_on_a_seed_it_never_completed_is_passed_over():
    # b completed seeds 0 and 2 (0.83, 0.83) but its seed 1 collapsed and early stopping cut it (0.50):
    # its mean is the survivors' mean; a, complete on every seed it ran, is exported
    rows = rows_of({"a": {0: 0.82, 1: 0.82}, "b": {0: 0.83, 2: 0.83}})
    rows.append({"number": 9, "state": "pruned", "objective": 0.5, "params": {"c": "b"}, "seed": 1})
    ests = {e.params["c"]: e for e in estimates(recs(rows))}
    assert ests["b"].stopped == {1} and ests["a"].stopped == set()
    assert winner_of(recs(rows)).params == {"c": "a"}
    # once the stopped seed completes, the configuration is judged by its mean again
    rows.append({"number": 10, "state": "completed", "objective": 0.83, "params": {"c": "b"}, "seed": 1})
    assert winner_of(recs(rows)).params == {"c": "b"}
    # with no alternative free of stopped seeds, the best mean still wins
    assert winner_of(recs([r for r in rows if r["number"] != 10 and r["params"] == {"c": "b"}])).params == {"c": "b"}


def test_status_reports_how_well_each_rung_predicts_the_end():
    from allocsearch.cli.search_view import render_summary
    from allocsearch.search.rungs import agreement, spearman

    rows = []
    for i, (early, mid, final) in enumerate([(0.50, 0.70, 0.83), (0.50, 0.74, 0.82), (0.72, 0.76, 0.78),
                                             (0.75, 0.79, 0.80), (0.78, 0.66, 0.70)]):
        rows.append({"number": i, "state": "completed", "objective": final, "steps": 100, "confirm": None,
                     "intermediate": {25: early, 50: mid, 75: mid, 100: final}})
    rows.append({"number": 7, "state": "completed", "objective": 0.5, "steps": 100, "confirm": 0,
                 "intermediate": {25: 0.9, 100: 0.5}})  # a confirmation run is never judged at a rung
    rows.append({"number": 8, "state": "pruned", "objective": 0.6, "steps": 25, "intermediate": {25: 0.6}})
    got = agreement(recs(rows))
    assert [r["step"] for r in got] == [25, 50] and [r["n"] for r in got] == [5, 5]  # rungs 25, 50 of 100
    assert got[0]["rho"] == pytest.approx(spearman([(r["intermediate"][25], r["objective"]) for r in rows[:5]]))
    assert got[0]["rho"] < 0 < got[1]["rho"]
    summary = {"study": "s", "root": "/r", "model": "m", "objectives": ["accuracy"], "counts": {},
               "budget": {"unit": "cpu", "total": 60.0, "text": "1cpu-min", "spent": 1.0, "fraction": 0.02,
                          "overshoot": 0.0}, "trials": [], "rungs": got}
    text = render_summary(summary, final=True)
    assert f"step 25: Spearman {got[0]['rho']:+.2f} over 5 completed" in text and "Spearman >= +0.50" in text
    assert agreement([]) == []


def test_a_single_run_above_the_raced_winner_is_labelled_as_one_seed():
    # "a" was raced (its seeds 1 and 2 are confirmation runs) and wins at 0.85; "e" scored 0.87 on its one
    # seed and was never re-run: status and the dashboard must not show it as a plain "tied" above the winner
    rows = rows_of({"a": {0: 0.85, 1: 0.86, 2: 0.84}, "b": {0: 0.845, 1: 0.855, 2: 0.845}, "e": {0: 0.87},
                    "d": {0: 0.84}, "c": {0: 0.70, 1: 0.71, 2: 0.69}})
    for r in rows:
        if r["seed"] > 0:
            r["confirm"] = 0
    ev = evidence(recs(rows))
    marks = {f["params"]["c"]: finalist_mark(f, ev) for f in ev["finalists"]}
    assert marks["a"] == "winner" and marks["b"] == "tied" and marks["e"] == "tied, 1 seed"
    assert marks["c"] == "" and marks["d"] == "tied"  # separated; below the winner on one seed: a plain tie
    from allocsearch.reports.status import finalists_table
    from allocsearch.cli.search_view import render_evidence

    assert {r["mark"] for r in finalists_table({"evidence": ev})} >= {"winner", "tied", "tied, 1 seed"}
    assert any(line.lstrip().startswith("tied, 1 seed 0.8700") for line in render_evidence(ev))


def test_status_says_why_single_seed_scores_were_not_confirmed():
    """Single-seed scores and ties: the line names what happens next, or why nothing will (never that a
    confirmation phase "re-runs the finalists" after a search that ended without one)."""
    from allocsearch.cli.search_view import render_evidence

    ev = evidence(recs(rows_of({"a": {0: 0.85}, "b": {0: 0.845}, "c": {0: 0.70}})))
    assert ev["noise"] is None and ev["tied"]

    def line(**kw):
        (text,) = render_evidence(ev, **kw)
        return text

    assert "re-runs the finalists before the search ends" in line(confirm=0.2, running=True)
    assert "ran no confirmation run: a resume with a larger --budget" in line(confirm=0.2, running=False)
    assert "confirmation was off: --confirm 0.2" in line(confirm=0.0, running=True)


def test_the_tabulated_quantiles_are_scipys():
    """t's 97.5% quantile per degree of freedom (1.96 beyond the table) and chi^2's median / df (tabulated to
    5, Wilson-Hilferty beyond), against scipy where scipy is installed."""
    stats = pytest.importorskip("scipy.stats")
    from allocsearch.study.confidence import _T95, _chi2_median_over_df, t95

    for df in range(1, len(_T95) + 1):
        assert t95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4), df
    assert t95(len(_T95) + 1) == 1.96 and t95(0) == 1.96
    for df in range(1, 40):
        assert _chi2_median_over_df(df) == pytest.approx(stats.chi2.median(df) / df, rel=2e-3), df


def test_an_estimate_as_a_dict():
    from allocsearch.study.confidence import Estimate, t95

    e = Estimate(key="k", params={"r": 8}, values={2: 0.8, 0: 0.7}, trials={2: 9, 0: 4})
    d = e.to_dict()
    assert d == {"params": {"r": 8}, "n": 2, "mean": pytest.approx(0.75), "std": pytest.approx(e.std),
                 "ci95": pytest.approx(t95(1) * e.std / math.sqrt(2)), "seeds": [0, 2], "trials": [4, 9],
                 "values": [0.7, 0.8]}
    one = Estimate(key="k", params={}, values={0: 0.7}, trials={0: 1})
    assert one.to_dict()["ci95"] is None and one.to_dict(noise=0.01)["ci95"] == pytest.approx(one.half_width(0.01))
