"""The recorded-table benchmark without training: a table written and read back, searches replayed on a
simulated clock through the controller's own code (confirmation phase, early stopping, budget), the
strategies scored, and ``allocsearch bench search`` end to end on a synthetic table."""
from __future__ import annotations

import json
import random
import statistics

import pytest
from conftest import run_cli

from allocsearch.bench import compare
from allocsearch.bench.replay import STRATEGIES, replay
from allocsearch.bench.table import Table, TableError, write
from allocsearch.study.confidence import config_key, separated

SPACE = {
    "version": 1, "model": "tiny-llama",
    "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 16, "validation": 8, "test": 8}]},
    "train": {"steps": 8, "batch_size": 4, "max_length": 64, "eval_every": 2, "eval_examples": 8,
              "lr": {"choice": [1.0e-3, 3.0e-3]}},
    "methods": {"mola": {"experts": {"choice": [2, 4]}, "top_k": {"int": [1, 2]}, "rank": {"choice": [2, 4]}},
                "lora": {"rank": {"choice": [2, 4]}}},
}


def grid_points():
    import optuna

    from allocsearch.search.samplers import make_sampler
    from allocsearch.search.space.space import SearchSpace

    space, sampler = SearchSpace.from_dict(SPACE), make_sampler("grid", 0)
    study = optuna.create_study(sampler=sampler)
    points = []
    while not sampler.used_up:
        trial = study.ask()
        params = space.sample(trial, 4)
        if params not in points:
            points.append(params)
        study.tell(trial, 0.0)
    return points


def truth_of(params: dict) -> float:
    """A synthetic task where allocation matters: the higher lr and MoLA with 4 experts help."""
    q = 0.70 + 0.05 * (params["lr"] == 3e-3)
    if params.get("method") == "mola":
        q += 0.03 * (params["mola.experts"] == 4) + 0.004 * params["mola.rank"]
    return q


def make_table(folder, noise=0.01, seeds=(0, 1, 2)):
    rng = random.Random(0)
    rows = []
    for p in grid_points():
        cost = 20.0 if p.get("method") == "mola" else 10.0
        for s in seeds:
            final = truth_of(p) + rng.gauss(0, noise)
            for step in (2, 4, 6):
                rows.append({"config": config_key(p), "seed": s, "step": step, "final": 0,
                             "validation": final - 0.05 * (8 - step) / 8 + rng.gauss(0, noise),
                             "device_seconds": 2.0 + cost * step / 8})
            rows.append({"config": config_key(p), "seed": s, "step": 8, "final": 1, "validation": final,
                         "test": final - 0.01, "device_seconds": cost + 3.0, "train_seconds": cost,
                         "trainable_params": 100})
    write(folder, rows, {"name": "synthetic", "cpus_per_trial": 1.0, "budget_unit": "cpu"}, json.dumps(SPACE))
    return Table.load(folder)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return make_table(tmp_path_factory.mktemp("table"))


def test_a_table_reads_back_what_was_written(table, tmp_path):
    assert len(table.runs) == 20 and table.seeds == [0, 1, 2]
    ests = table.estimates()
    best = max(grid_points(), key=truth_of)
    assert ests[0].params == best  # the synthetic truth's best is the table's (noise 0.01 < its margin)
    assert 0.005 < table.noise() < 0.02
    # the grid: 4 LoRA configurations at 13 s, 16 MoLA at 23 s
    assert table.grid_seconds() == pytest.approx(4 * 13 + 16 * 23)
    run = table.run(best, 1)
    assert [c[0] for c in run.checkpoints] == [2, 4, 6] and run.steps == 8 and run.test == pytest.approx(run.final - 0.01)
    with pytest.raises(TableError, match="not in the table"):
        table.run({"method": "lora", "lora.rank": 99, "lr": 1e-3}, 0)
    # a table missing a seed of one configuration is refused with the fix
    rows = [r for r in _rows_of(table) if not (r["seed"] == 2 and r["config"] == ests[0].key)]
    write(tmp_path / "x", rows, {}, json.dumps(SPACE))
    with pytest.raises(TableError, match="lack some of the seeds"):
        Table.load(tmp_path / "x")
    with pytest.raises(TableError, match="no benchmark table"):
        Table.load(tmp_path / "nothing")


def _rows_of(table):
    out = []
    for key, by in table.runs.items():
        for seed, run in by.items():
            for step, value, seconds in run.checkpoints:
                out.append({"config": key, "seed": seed, "step": step, "final": 0, "validation": value,
                            "device_seconds": seconds})
            out.append({"config": key, "seed": seed, "step": run.steps, "final": 1, "validation": run.final,
                        "device_seconds": run.device_seconds})
    return out


def test_a_grid_with_the_whole_budget_runs_every_configuration_once(table):
    trace = replay(table, "grid", budget_seconds=1.05 * table.grid_seconds(), seed=0)
    assert trace.trials == 20 and trace.confirm_trials == 0
    assert trace.end_reason == "every point of the grid has run"
    assert trace.spent == pytest.approx(table.grid_seconds())
    # what it exports is the argmax of the single seeds it saw; every configuration is in the table
    assert trace.final in table.runs and trace.argmax == trace.final


def test_a_search_confirms_its_finalists_inside_its_reserve(table, monkeypatch):
    # without early stopping every trial completes, so the race has finalists
    monkeypatch.setitem(STRATEGIES, "tpe-confirm", {**STRATEGIES["default"], "scheduler": "none"})
    budget = 0.7 * table.grid_seconds()
    trace = replay(table, "tpe-confirm", budget_seconds=budget, seed=3)
    assert trace.confirm_trials >= 2  # the finalists re-ran on fresh seeds
    assert trace.confirm_given >= 0.2 * budget - 1e-6  # the reserve was held back for it
    assert trace.confirm_seconds <= trace.confirm_given + 1e-6
    assert trace.spent <= budget * 1.001
    # a confirmation run starts only where it can finish: one the budget cut would count for nothing
    cut = [replay(table, "tpe-confirm", budget_seconds=share * table.grid_seconds(), seed=s).confirm_cut
           for share in (0.3, 0.45, 0.6) for s in range(3)]
    assert sum(cut) == 0
    assert trace.final in table.runs and "confirmation" in trace.end_reason


def test_the_reserve_is_spent_and_the_trace_is_monotone(table):
    budget = 0.6 * table.grid_seconds()
    trace = replay(table, "default-plain-asha", budget_seconds=budget, seed=3)
    assert trace.confirm_given >= 0.2 * budget * 0.95 and trace.spent > 0.85 * budget
    # spend is monotone along the trace and the anytime export is defined after the first trial
    spends = [p[0] for p in trace.points]
    assert spends == sorted(spends) and trace.export_at(spends[0]) is not None and trace.export_at(-1) is None


def test_replays_are_reproducible_and_differ_across_seeds(table):
    budget = 0.3 * table.grid_seconds()
    a = replay(table, "random-asha", budget_seconds=budget, seed=5)
    b = replay(table, "random-asha", budget_seconds=budget, seed=5)
    c = replay(table, "random-asha", budget_seconds=budget, seed=6)
    assert a.points == b.points and a.points != c.points
    assert a.trials > budget / 23  # early stopping made room for more trials than whole runs would


def test_each_replay_draws_its_own_recorded_seeds(table, monkeypatch):
    # the search's seed 0 of a configuration is answered by a random one of the table's seeds, per replay
    firsts = {}
    for seed in range(8):
        trace = replay(table, "grid", budget_seconds=1.05 * table.grid_seconds(), seed=seed)
        for key, table_seed, _ in trace.runs:
            firsts.setdefault(key, set()).add(table_seed)
    assert all(len(v) >= 2 for v in firsts.values())  # 8 replays: not always the same recorded seed
    # and within one replay a configuration's repeats never reuse a recorded seed
    monkeypatch.setitem(STRATEGIES, "tpe-confirm", {**STRATEGIES["default"], "scheduler": "none"})
    trace = replay(table, "tpe-confirm", budget_seconds=0.6 * table.grid_seconds(), seed=3)
    used = {}
    for key, table_seed, _ in trace.runs:
        used.setdefault(key, []).append(table_seed)
    assert any(len(v) > 1 for v in used.values()) and all(len(v) == len(set(v)) for v in used.values())


def test_priors_only_runs_the_papers_settings_and_stops(table):
    from allocsearch.search.space.space import SearchSpace, model_depth

    space = SearchSpace.from_dict(table.space)
    priors = [params for _, params in space.priors(model_depth(space.model))]
    trace = replay(table, "priors-only", budget_seconds=table.grid_seconds(), seed=0)
    assert trace.end_reason == "every prior has run" and priors
    # each prior once and whole (a prior fixes some parameters; the sampler fills the rest), nothing else
    assert trace.trials == len(trace.runs) == len(priors)
    for (key, _, _), prior in zip(trace.runs, priors):
        assert prior.items() <= json.loads(key).items()
    scores = {key: table.runs[key][seed].final for key, seed, _ in trace.runs}
    assert trace.final == max(scores, key=scores.get)  # the best-scoring run is what it exports


def test_compare_scores_strategies_against_the_tables_truth(table):
    result = compare.run(table, ["default", "random", "grid"], [0.25, 0.5], seeds=3)
    rows = {(r["strategy"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {(s, b) for s in ("default", "random", "grid") for b in (0.25, 0.5)}
    best, median = table.estimates()[0].mean, statistics.median(e.mean for e in table.estimates())
    for r in rows.values():
        assert r["seeds"] == 3 and 0 <= r["hit"] <= 1
        # regret is the quality put on the 0 (best) .. 1 (median) scale: the mean of one is the other's
        assert r["regret"][0] == pytest.approx((best - r["quality"][0]) / (best - median))
    assert rows[("grid", 0.5)]["confirm_share"] == 0 and rows[("default", 0.5)]["confirm_share"] > 0
    curve = result["curves"]["default"]
    assert len(curve["seconds"]) == compare.CURVE_POINTS and curve["seconds"][-1] == pytest.approx(0.5 * table.grid_seconds())
    goals = compare.goals(result)
    assert [g[0][:40] for g in goals][0].startswith("default within noise")
    assert all(isinstance(met, bool) for _, met, _ in goals)
    hit_goal = next(text for goal, _, text in goals if "tied in >= 90%" in goal)
    assert "at 25%" in hit_goal and "at 50%" in hit_goal  # every budget's rate, not only the lowest
    # beside each, the best rate any strategy reached at that budget: what the budget allows at all
    for b in (0.25, 0.5):
        top = max(rows, key=lambda sb: (sb[1] == b, rows[sb]["hit"]))
        assert f"best strategy {top[0]} {rows[top]['hit']:.0%}) at {b:.0%}" in hit_goal


def test_the_replays_default_is_what_allocsearch_start_runs_by_default(table, tmp_path, monkeypatch):
    from allocsearch.study import folder as study_module
    from allocsearch.study.settings import EXECUTION_DEFAULTS

    seen = []
    create = study_module.Study.create
    monkeypatch.setattr(study_module.Study, "create",
                        classmethod(lambda cls, root, settings, space: seen.append(settings) or create(root, settings, space)))
    replay(table, "default", budget_seconds=0.2 * table.grid_seconds(), seed=0)
    s = seen[0]
    assert (s["sampler"], s["scheduler"], s["priors"]) == ("tpe", EXECUTION_DEFAULTS["scheduler"], True)
    assert s["confirm"] == EXECUTION_DEFAULTS["confirm"] and s["noise"] == EXECUTION_DEFAULTS["noise"]
    assert s.get("noise_aware_stopping", True)  # the controller's default


def test_a_hit_is_judged_by_the_tables_noise_not_a_paired_test_on_three_seeds(tmp_path):
    finals = [(0.830, 0.836, 0.824), (0.835, 0.50, 0.84), (0.826, 0.820, 0.814), (0.70, 0.706, 0.694)]
    points, rows = grid_points()[:4], []
    for p, values in zip(points, finals):
        for s, v in enumerate(values):
            rows.append({"config": config_key(p), "seed": s, "step": 8, "final": 1, "validation": v, "test": v,
                         "device_seconds": 10.0, "train_seconds": 9.0, "trainable_params": 100})
    write(tmp_path / "t", rows, {"name": "hits", "cpus_per_trial": 1.0, "budget_unit": "cpu"}, json.dumps(SPACE))
    scorer = compare._Scorer(Table.load(tmp_path / "t"))
    best, collapsed, close, bad = (config_key(p) for p in points)
    assert scorer.best.key == best and scorer.noise == pytest.approx(0.006 / 0.6931 ** 0.5, rel=0.01)
    assert scorer.hit(best) and scorer.hit(close)  # 0.010 below the best: inside 1.96 noise sqrt(2/3)
    # a seed collapsed to chance (true mean 0.725): the paired t-test on 3 seeds cannot separate it, the noise can
    assert not separated(scorer.by_key[best], scorer.by_key[collapsed], scorer.noise)
    assert not scorer.hit(collapsed) and not scorer.hit(bad) and not scorer.hit(None)


@pytest.mark.parametrize("bad,message", [("--budgets 10%,x", "is not a share"), ("--budgets 0%", "above 0%"),
                                         ("--strategies default,nope", "nope unknown"), ("--seeds 0", "at least once")])
def test_bench_search_refuses_bad_flags_in_one_line(tmp_path, capsys, bad, message):
    folder = tmp_path / "t"
    make_table(folder)
    code, out, err = run_cli(capsys, "bench", "search", "--table", str(folder), *bad.split())
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (folder / "replay.png").exists()
    code, _, err = run_cli(capsys, "bench", "search", "--table", str(tmp_path / "none"))
    assert code != 0 and "no benchmark table" in err


def test_bench_search_prints_the_goals_and_draws_the_plot(tmp_path, capsys):
    folder = tmp_path / "t"
    make_table(folder)
    code, text, err = run_cli(capsys, "bench", "search", "--table", str(folder), "--seeds", "2", "--budgets", "50%",
                              "--strategies", "default,random", "--json")
    assert code == 0, err
    out = json.loads(text)
    assert (folder / "replay.png").read_bytes()[:4] == b"\x89PNG"
    assert {r["strategy"] for r in out["rows"]} == {"default", "random"} and len(out["goals"]) == 4


def test_confirmation_runs_are_never_stopped_early(tmp_path):
    # a noisier table: ASHA (with its noise margin) completes several configurations, so the race runs
    noisy = make_table(tmp_path / "noisy", noise=0.04)
    from allocsearch.search import controller as controller_module

    seen = []
    real = controller_module.Controller.on_complete

    def spy(self, number, result, error):
        trial = self.running[number].trial if number in self.running else None
        if trial is not None and "confirm" in trial.user_attrs:
            seen.append((result or {}).get("final"))
        return real(self, number, result, error)

    controller_module.Controller.on_complete = spy
    try:
        trace = replay(noisy, "default", budget_seconds=0.6 * noisy.grid_seconds(), seed=2)
    finally:
        controller_module.Controller.on_complete = real
    assert trace.confirm_trials >= 2 and seen and all(seen)  # every confirmation run ended with its final report


def test_tunes_face_of_the_rungs_never_stops_a_confirmation_run():
    from ray.tune.schedulers import TrialScheduler

    from allocsearch.search.ray.executor import RungScheduler
    from allocsearch.search.rungs import Rungs

    class T:
        def __init__(self, i, confirm=False):
            self.trial_id, self.config = str(i), {"number": i, "confirm": confirm}

    sched = RungScheduler(Rungs(100, 25, 2, 0.0))
    for i, value in enumerate((0.80, 0.82)):
        assert sched.on_trial_result(None, T(i), {"step": 25, "objective": value}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, T(2), {"step": 25, "objective": 0.5}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, T(3, confirm=True), {"step": 25, "objective": 0.5}) == TrialScheduler.CONTINUE


def test_the_replay_shows_the_scheduler_each_final_report_as_tune_does(table, monkeypatch):
    # the rungs learn whether they predict the end from completed trials' final scores; without them
    # a replayed default search would never stop a trial early
    import allocsearch.search.ray.executor as executor

    made, real = [], executor.make_scheduler

    def keep(plan):
        made.append(real(plan))
        return made[-1]

    monkeypatch.setattr(executor, "make_scheduler", keep)
    trace = replay(table, "default", budget_seconds=0.8 * table.grid_seconds(), seed=1)
    rungs = made[0].rungs
    assert rungs.min_pairs == 5 and len(rungs.finals) >= 5
    assert len(rungs.finals) <= trace.trials - trace.confirm_trials  # search trials only: a confirmation run is never judged
    assert any(rungs.trusted(m) for m in rungs.milestones[:-1])  # this table's early scores predict the end
