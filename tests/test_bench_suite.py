"""``allocsearch bench suite``: every strategy (peers included) on every table, average ranks with ties,
the allocation ratio that says which tables have signal, and the goals (synthetic tables)."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_bench_placement import ka_table
from test_bench_replay import make_table

from allocsearch.bench import suite


def test_average_ranks_share_ties_and_average_over_tables():
    rows = lambda regrets: {"rows": [{"strategy": s, "budget": 0.25, "regret": (v, 0.0)}  # noqa: E731
                                     for s, v in regrets.items()]}
    per = {"a": rows({"x": 0.1, "y": 0.1, "z": 0.5}), "b": rows({"x": 0.3, "y": 0.2, "z": 0.1})}
    ranks = suite.average_ranks(per, ["x", "y", "z"], [0.25])[0.25]
    assert ranks == {"x": (1.5 + 3) / 2, "y": (1.5 + 2) / 2, "z": (3 + 1) / 2}


def test_the_allocation_ratio_compares_allocations_at_the_best_learning_rate(tmp_path):
    table = make_table(tmp_path / "t")  # at lr 3e-3: LoRA 0.75, MoLA 0.75 + 0.03 (4 experts) + 0.004 x rank
    ests = table.estimates()
    same_lr = [e.mean for e in ests if e.params["lr"] == ests[0].params["lr"]]
    import statistics

    assert len(same_lr) == 10
    assert suite.allocation_ratio(table) == pytest.approx(statistics.pstdev(same_lr) / table.noise())
    flat = ka_table(tmp_path / "flat", (0.0, 0.0, 0.0))  # every placement the same: no signal
    assert suite.allocation_ratio(flat) < suite.SIGNAL_RATIO < suite.allocation_ratio(
        ka_table(tmp_path / "ka", (-0.03, 0.2, -0.03)))


def test_bench_suite_replays_every_table_and_prints_the_goals(tmp_path, capsys):
    make_table(tmp_path / "tables" / "synthetic")
    ka_table(tmp_path / "tables" / "ka", (-0.03, 0.2, -0.03))
    code, out, err = run_cli(capsys, "bench", "suite", "--tables", str(tmp_path / "tables"), "--seeds", "2",
                             "--budgets", "25%,50%", "--strategies", "default,random,optuna:tpe-hb,ray:asha",
                             "--json", "--out", str(tmp_path / "suite.json"))
    assert code == 0, err
    result = json.loads(out)
    assert json.loads((tmp_path / "suite.json").read_text())["ranks"] == result["ranks"]
    assert set(result["tables"]) == {"synthetic", "ka"} and (tmp_path / "tables" / "suite.png").is_file()
    assert result["tables"]["ka"]["known_answer"]["group"] == "middle"
    for r in result["tables"].values():
        assert r["signal"] == (r["ratio"] >= suite.SIGNAL_RATIO)
    assert result["tables"]["ka"]["signal"] and not result["tables"]["synthetic"]["signal"]  # ratio 1.6
    goals = {g: met for g, met, _ in result["goals"]}
    assert any(g.startswith("ka known answer (middle group)") for g in goals)
    peer_goal = next(g for g in goals if g.startswith("tables with signal: default's regret at or below every peer's "
                                                      "at 25%"))
    rows = {(r["strategy"], r["budget"]): r for r in result["tables"]["ka"]["rows"]}  # a known-answer table
    # has signal, but the peers' goal is judged on the real tables with signal only: none here
    assert goals[peer_goal] is None and rows[("default", 0.25)]["placed"] is not None
    assert sorted(result["ranks"]["0.25"]) == sorted(["default", "random", "optuna:tpe-hb", "ray:asha"])


@pytest.mark.parametrize("args, message", [
    (["--tables", "nowhere-table"], "has no table.csv"),
    (["--strategies", "default,hyperopt:tpe"], "hyperopt:tpe unknown"),
    (["--seeds", "0"], "--seeds 0"),
])
def test_bench_suite_refuses_bad_flags_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "bench", "suite", *args)
    assert code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_goals_on_a_table_with_signal_name_the_peer_that_beats_default():
    def row(s, b, regret, se=0.01):
        return {"strategy": s, "budget": b, "regret": (regret, se)}

    real = {"signal": True, "priors": True, "known_answer": None,
            "rows": [row("default", 0.25, 0.10), row("optuna:tpe-hb", 0.25, 0.05), row("priors-only", 0.25, 0.40),
                     row("default", 0.5, 0.02), row("optuna:tpe-hb", 0.5, 0.02), row("priors-only", 0.5, 0.03)]}
    result = {"tables": {"real": real}, "strategies": ["default", "optuna:tpe-hb", "priors-only"],
              "budgets": [0.25, 0.5]}
    goals = {g: (met, text) for g, met, text in suite.goals(result)}
    at25 = goals["tables with signal: default's regret at or below every peer's at 25% of the grid"]
    assert at25 == (False, "real: optuna:tpe-hb 0.05 < default 0.10")
    assert goals["tables with signal: default's regret at or below every peer's at 50% of the grid"][0] is True
    priors = goals["tables with signal: default's regret below priors-only's by >= 2 standard errors at 25% and 50%"]
    assert priors[0] is False and "real at 25%: +0.30 (+21.2 SE)" in priors[1] and "at 50%: +0.01 (+0.7 SE)" in priors[1]


def test_a_strategy_missing_on_a_table_is_ranked_on_the_tables_it_ran_on(tmp_path, capsys):
    """priors-only is not replayed on a space without priors (a known-answer one): it would export nothing,
    which the regret scores as the median configuration."""
    rows = lambda regrets: {"rows": [{"strategy": s, "budget": 0.25, "regret": (v, 0.0)}  # noqa: E731
                                     for s, v in regrets.items()]}
    per = {"a": rows({"x": 0.1, "p": 0.5}), "b": rows({"x": 0.3})}
    assert suite.average_ranks(per, ["x", "p"], [0.25])[0.25] == {"x": 1.0, "p": 2.0}
    make_table(tmp_path / "tables" / "synthetic")
    ka_table(tmp_path / "tables" / "ka", (-0.03, 0.2, -0.03))
    code, out, err = run_cli(capsys, "bench", "suite", "--tables", str(tmp_path / "tables"), "--seeds", "1",
                             "--budgets", "50%", "--strategies", "default,priors-only", "--json")
    result = json.loads(out)
    assert {r["strategy"] for r in result["tables"]["ka"]["rows"]} == {"default"}
    assert {r["strategy"] for r in result["tables"]["synthetic"]["rows"]} == {"default", "priors-only"}


def test_a_difference_without_spread_is_not_infinitely_many_standard_errors():
    """Every replay of both strategies exported the same configuration: +0.0, not "+inf SE" (which read as a win)."""
    from allocsearch.bench.compare import in_se

    assert in_se(0.0, 0.0) == "+0.0 SE (identical exports)"
    assert in_se(0.01, 0.005) == "+2.0 SE" and in_se(-0.003, 0.0) == "-0.0030 with no spread"


def test_the_suite_plot_gives_each_strategy_one_colour_of_its_own_on_both_sides(tmp_path, monkeypatch):
    """17 strategies (more than matplotlib's 10 default colours): a strategy's rank line and its bars share a
    colour no other strategy has; the peers' lines are dashed."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from allocsearch.bench.plots import draw_suite

    names = ["default", "grid", "random"] + [f"p{i}:x" for i in range(14)]
    row = lambda s: {"strategy": s, "budget": 0.25, "regret": [1.0, 0.1]}  # noqa: E731
    suite = {"strategies": names, "budgets": [0.1, 0.25], "seeds": 2,
             "ranks": {b: {s: float(i) for i, s in enumerate(names)} for b in (0.1, 0.25)},
             "tables": {"t": {"rows": [row(s) for s in names]}}}
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    draw_suite(suite, tmp_path / "suite.png")
    left, right = kept[0].axes[:2]
    lines = {ln.get_label(): ln for ln in left.get_lines()}
    bars = {c.get_label(): c.patches[0] for c in right.containers if hasattr(c, "patches")}
    colours = [to_rgb(lines[s].get_color()) for s in names]
    assert len(set(colours)) == len(names)
    assert all(to_rgb(bars[s].get_facecolor()) == to_rgb(lines[s].get_color()) for s in names)
    assert {s for s in names if lines[s].get_linestyle() == "--"} == set(names[3:])
