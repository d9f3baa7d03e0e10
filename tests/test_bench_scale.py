"""``allocsearch bench scale``: a replayed study with the live storage, its controller costs per trial, its
folder, and status / dashboard load times; the controller's methods are the real ones afterwards."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli

from allocsearch.bench import scale
from allocsearch.search.controller import Controller


def test_a_small_scaled_study_is_measured_and_readable(tmp_path):
    propose, complete = Controller.propose, Controller.on_complete
    row = scale.measure(30, tmp_path / "w")
    assert Controller.propose is propose and Controller.on_complete is complete  # the timers are gone
    assert row["trials"] >= 30 and row["status_rc"] == 0
    assert 0 < row["propose_per_trial"] + row["complete_per_trial"] <= row["seconds_per_trial"]
    assert row["overhead_share"] == pytest.approx(row["seconds_per_trial"] / scale.TRIAL_SECONDS)
    assert 0 < row["last_tenth_seconds_per_trial"] < 10 * row["seconds_per_trial"]
    root = tmp_path / "w" / "replay-default-0"
    assert (root / "optuna.db").is_file() and row["folder_mb"] > 0
    from allocsearch.reports import status

    assert status.summarize(root)["counts"]["completed"] >= 1


def test_the_last_tenth_reads_the_cost_at_the_end_not_the_average():
    # 90 trials 0.1 s apart, then 10 at 1 s apart: the average is 0.19 s, the last tenth's spacing is 1 s
    ends = [0.1 * i for i in range(90)] + [8.9 + i for i in range(1, 11)]
    assert scale.last_tenth_per_trial(ends) == pytest.approx(1.0)
    assert scale.last_tenth_per_trial([3.0, 5.0]) == pytest.approx(2.0)  # two ends: their gap


def test_the_synthetic_table_answers_every_configuration_the_same_way_twice():
    table = scale.SyntheticTable()
    params = {"mola.experts_g0": 1, "mola.experts_g1": 4, "mola.experts_g2": 8, "mola.rank": 8, "lr": 1e-3}
    a, b = table.run(params, 1), table.run(dict(reversed(params.items())), 1)
    assert a == b and a.final != table.run(params, 2).final and [c[0] for c in a.checkpoints] == [25, 50, 75]


@pytest.mark.parametrize("args, message", [(["--trials", "ten"], "--trials 'ten'"), (["--trials", "5"], "at least 10")])
def test_bench_scale_refuses_bad_flags_in_one_line(tmp_path, capsys, args, message):
    code, out, err = run_cli(capsys, "bench", "scale", "--workdir", str(tmp_path / "new"), *args)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1


def test_bench_scale_refuses_a_folder_with_something_in_it(tmp_path, capsys):
    (tmp_path / "x").write_text("keep")
    code, out, err = run_cli(capsys, "bench", "scale", "--workdir", str(tmp_path), "--trials", "10")
    assert code != 0 and "not empty" in err and (tmp_path / "x").read_text() == "keep"
