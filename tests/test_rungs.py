"""Noise-aware ASHA's rungs (allocsearch.search.rungs) at their edges, computed by hand: ranks with ties,
Spearman's rho, the milestones, the cutoff, the evidence a rung needs, and the agreement status prints.
(Written where mutation testing showed these edges unchecked: docs/mutation.md.)"""
from __future__ import annotations

import math

import pytest

from allocsearch.search.rungs import Rungs, _ranks, agreement, spearman
from allocsearch.study.records import TrialRecord


def test_ranks_are_one_based_and_ties_share_their_average():
    assert _ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]
    assert _ranks([5.0]) == [1.0]


def test_spearman_by_hand():
    assert spearman([(1, 2), (2, 3)]) == pytest.approx(1.0)  # two pairs are enough
    assert spearman([(1, 3), (2, 2)]) == pytest.approx(-1.0)
    # ties: ranks x 1.5 1.5 3, y 1 2 3 -> sxy 1.5, sxx 1.5, syy 2
    assert spearman([(1, 1), (1, 2), (2, 3)]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert spearman([(1, 1), (1, 2)]) is None and spearman([(1, 2), (2, 2)]) is None  # a constant side


@pytest.mark.parametrize("args", [dict(max_t=8, grace_period=0), dict(max_t=2, grace_period=4),
                                  dict(max_t=8, grace_period=1, reduction_factor=1.0),
                                  dict(max_t=8, grace_period=1, margin=-0.1),
                                  dict(max_t=8, grace_period=1, min_pairs=-1)])
def test_each_bad_setting_alone_is_refused(args):
    with pytest.raises(ValueError, match="bad rungs"):
        Rungs(**args)


def test_milestones_from_the_grace_period_to_max_t():
    assert Rungs(8, 1).milestones == [1, 2, 4, 8]  # grace 1 is allowed
    assert Rungs(100, 25).milestones == [25, 50, 100]  # log2(4) + 1 rungs exactly
    assert Rungs(25, 25).milestones == [25]  # max_t == grace period is allowed
    assert Rungs(90, 10, reduction_factor=3).milestones == [10, 30, 90]


def test_the_cutoff_stops_strictly_below_it_by_default_without_margin():
    rungs = Rungs(8, 2)
    assert not rungs.stop("a", 2, 0.8)  # the first at a rung has nothing to compare with
    rungs.recorded[2]["b"] = 0.6
    # the cutoff at rung 2 is the median of 0.8 and 0.6 (rf 2): 0.7; exactly at it goes on, below stops
    assert not rungs.stop("c", 2, 0.7)
    assert rungs.stop("d", 2, 0.69)
    assert not rungs.stop("e", 2, None) and not rungs.stop("f", 2, float("nan"))
    assert "e" not in rungs.recorded[2] and "f" not in rungs.recorded[2]


def test_a_rung_is_trusted_once_its_rho_reaches_the_threshold_exactly():
    rungs = Rungs(8, 2, min_pairs=3, min_rho=0.5)
    for key, at_rung, final in (("a", 1.0, 2.0), ("b", 2.0, 1.0), ("c", 3.0, 3.0)):
        rungs.recorded[2][key] = at_rung
        assert not rungs.trusted(2)  # fewer than 3 pairs until the last final
        rungs.final(key, final)
    assert spearman([(1.0, 2.0), (2.0, 1.0), (3.0, 3.0)]) == pytest.approx(0.5)
    assert rungs.trusted(2)  # rho 0.5 >= 0.5
    rungs.final("d", None)
    rungs.final("e", float("nan"))
    assert set(rungs.finals) == {"a", "b", "c"}


def test_checkpoints_are_judged_in_step_order_not_text_order():
    rungs = Rungs(16, 4)
    assert rungs.judged_at({"16": 0.9, "4": 0.5, "8": 0.7}) == {4: 0.5, 8: 0.7, 16: 0.9}
    # by step, 9 is judged first (at rung 8, the highest it reached), then 10 at the highest left (4);
    # as text "10" would come first and take rung 8
    assert rungs.judged_at({"10": 0.7, "9": 0.5}) == {8: 0.5, 4: 0.7}


def test_agreement_needs_two_completed_trials_per_rung():
    def done(n, at, final, steps=8):
        return TrialRecord(n, "completed", final, {"x": n}, steps=steps, intermediate=at)

    rows = [done(0, {2: 0.5, 4: 0.6}, 0.7), done(1, {2: 0.6, 4: 0.5}, 0.8, steps=None)]
    got = agreement(rows)
    assert [r["step"] for r in got] == [2, 4] and [r["n"] for r in got] == [2, 2]
    assert got[0]["rho"] == pytest.approx(1.0) and got[1]["rho"] == pytest.approx(-1.0)
    assert agreement(rows[:1])[0]["rho"] is None and agreement([]) == []
    # trials that did not say their steps end at the last checkpoint: only the rungs before it count
    unknown = [done(0, {2: 0.5, 4: 0.6}, 0.7, steps=None), done(1, {2: 0.6, 4: 0.5}, 0.8, steps=None)]
    assert [r["step"] for r in agreement(unknown)] == [2]
