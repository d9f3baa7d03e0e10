"""The confirmation phase inside a search (the controller driven by hand, as Ray would), and the evidence
it leaves: every seed its own trial linked to its configuration, the reserve respected, and the same
winner with its mean +- CI and ties in ``status``, ``export`` and Optuna's best."""
from __future__ import annotations

import io
import random

import pytest
import yaml
from test_confidence import recs
from test_search_controller import Clock, final, make

from allocsearch.reports import status as analysis
from allocsearch.cli.search_view import LiveView, render_summary
from allocsearch.study.confidence import config_key
from allocsearch.reports.export import export_trial


def score(params: dict, seed: int) -> float:
    """A task where the learning rate matters and seeds add noise (std 0.01)."""
    return 0.70 + 20 * params["lr"] + random.Random(f"{config_key(params)}-{seed}").gauss(0, 0.01)


def search(tmp_path, budget="12cpu-min", **settings):
    """Run a whole search through the controller's hooks (or resume the study in ``tmp_path``, whose stored
    budget then holds); returns (controller, [(number, config)])."""
    clock = Clock()
    ctl = make(tmp_path, budget=budget, clock=clock, scheduler="none", max_seeds=4, **settings)
    ran = []
    for _ in range(200):
        config = ctl.propose()
        if config == "finished":
            break
        assert config is not None  # one trial at a time: nothing is running to wait for
        n = config.number
        ctl.on_start(n)
        clock.t += 30.0
        params = ctl.running[n].params
        ctl.on_complete(n, final(objective=score(params, config.spec["train"]["seed"])), error=False)
        ran.append((n, config))
    ctl.close()
    return ctl, ran


def test_the_confirmation_phase_reruns_finalists_on_fresh_seeds_inside_its_reserve(tmp_path):
    ctl, ran = search(tmp_path, confirm=0.3)
    trials = {t.number: t for t in ctl.store.trials()}
    confirm = [n for n, _ in ran if trials[n].user_attrs.get("confirm") is not None]
    assert len(confirm) >= 3, ctl.end_reason
    for n in confirm:
        t, first = trials[n], trials[trials[n].user_attrs["confirm"]]
        assert t.params == first.params  # linked to its configuration's first trial
        assert t.user_attrs["seed"] != first.user_attrs["seed"]  # on a fresh seed
        assert dict(ran)[n].spec["train"]["seed"] == t.user_attrs["seed"]  # the seed the trial trained with
    seeds = {}
    for n in confirm:
        seeds.setdefault(config_key(trials[n].params), []).append(trials[n].user_attrs["seed"])
    assert all(len(v) == len(set(v)) for v in seeds.values())  # no seed twice for a configuration
    spent = ctl.study.ledger.trial_spend()
    assert sum(spent[n] for n in confirm) <= 0.3 * 12 * 60 + 30.0  # the reserve (plus what the search left)
    assert "confirmation" in ctl.end_reason or "nothing more fits" in ctl.end_reason


def test_status_export_and_optuna_name_the_same_winner_with_its_evidence(tmp_path):
    ctl, _ = search(tmp_path, confirm=0.3)
    summary = analysis.summarize(ctl.study.root)
    ev = summary["evidence"]
    assert ev["winner"]["n"] >= 2 and ev["noise"] is not None
    best = summary["best"]
    assert config_key(best["params"]) == config_key(ev["winner"]["params"]) and best["trial"] == ev["winner"]["trials"][0]
    assert best["value"] == pytest.approx(ev["winner"]["mean"]) and best["n"] == ev["winner"]["n"]
    text = render_summary(summary, final=True)
    assert "finalists (mean +- 95% CI over seeds" in text and "winner" in text
    assert f"{ev['winner']['mean']:.4f}" in text
    # the best line shows the winner's mean (not its first seed's score), as the finalists do
    assert f"best    trial {best['trial']}: {ev['winner']['mean']:.4f} (mean of {ev['winner']['n']} seeds)" in text
    doc = yaml.safe_load(export_trial(ctl.study.root, best["trial"]))
    evidence = doc["provenance"]["evidence"]
    assert evidence["is_winner"] and evidence["this"]["n"] == ev["winner"]["n"]
    assert evidence["this"]["mean"] == pytest.approx(ev["winner"]["mean"])
    assert evidence["tied_count"] == len(ev["tied"])
    rows = analysis.finalists_table(summary)
    assert rows[0]["mark"] == "winner" and rows[0]["n"] == ev["winner"]["n"]
    from allocsearch.tracking.data import summary_metrics  # what the MLflow parent run gets at the end

    metrics, tags = summary_metrics(summary, 0)
    logged = {k: v for k, v, _, _ in metrics}
    assert logged["best.objective"] == pytest.approx(ev["winner"]["mean"]) and logged["best.seeds"] == ev["winner"]["n"]
    assert logged["best.trial"] == best["trial"] and tags["best.trials"].split(",")[0] == str(best["trial"])
    assert "best_objective" not in logged and "winner.mean" not in logged  # one name for the best, live and final


def test_with_confirmation_off_the_budget_all_goes_to_the_search(tmp_path):
    ctl, ran = search(tmp_path, confirm=0.0)
    trials = {t.number: t for t in ctl.store.trials()}
    assert not any(t.user_attrs.get("confirm") is not None for t in trials.values())
    assert ctl.keeper.held == 0.0 and len(ran) >= 22  # 12 CPU-min of 30 s trials, nothing held back


def test_a_reserve_too_small_for_one_whole_run_goes_to_the_search(tmp_path):
    # 2 CPU-min, 30 s trials: a 20% reserve (24 s) cannot pay for one confirmation run (30 s x margin 1.2)
    clock = Clock()
    ctl = make(tmp_path, budget="2cpu-min", clock=clock, scheduler="none", max_seeds=4, confirm=0.2)
    assert ctl.keeper.held == pytest.approx(24.0)
    events = []
    ctl.emit = lambda kind, **data: events.append((kind, data))
    ran = 0
    for _ in range(20):
        config = ctl.propose()
        if config == "finished":
            break
        ctl.on_start(config.number)
        clock.t += 30.0
        ctl.on_complete(config.number, final(objective=score(ctl.running[config.number].params, 0)),
                        error=False)
        ran += 1
    ctl.close()
    released = [d for kind, d in events if kind == "confirming"]
    assert released and "cannot pay for 1 whole confirmation run" in released[0]["ended"]
    assert ctl.keeper.held == 0.0 and ctl.reserve.phase == "search, reserve released"
    assert ran == 4  # the whole budget went to search trials (with 24 s held back, 3 would have run)


def test_with_one_completed_configuration_the_reserve_goes_back_to_the_search():
    """Nothing to race (every other trial was stopped early): the reserve is freed for more search trials."""
    from allocsearch.search.budget import Budget, BudgetKeeper
    from allocsearch.search.confirmation import Confirmation, Reserve

    keeper = BudgetKeeper(Budget.parse("10cpu-min"), 0.0, clock=lambda: 0.0)
    events = []
    reserve = Reserve(keeper, Confirmation(max_seeds=4), 120.0, lambda kind, **data: events.append((kind, data)))
    assert keeper.held == 120.0 and keeper.free() == pytest.approx(480.0)
    best, other = {"lr": 2e-3, "method": "lora"}, {"lr": 1e-3, "method": "lora"}
    rows = [{"number": 0, "state": "completed", "params": best, "seed": 0, "objective": 0.82, "confirm": None},
            {"number": 1, "state": "pruned", "params": other, "seed": 0, "objective": 0.70, "confirm": None}]
    assert reserve.begin(recs(rows)) is True  # budget to go on with
    assert keeper.held == 0.0 and keeper.free() == pytest.approx(600.0)
    assert reserve.phase == "search, reserve released"
    (kind, data), = events
    assert data["ended"] == "only one configuration completed" and data["reserve"] == pytest.approx(600.0)
    assert reserve.begin(recs(rows)) is False  # once only


def test_a_search_that_could_not_pay_for_confirmation_confirms_when_resumed_with_a_larger_budget(tmp_path):
    """What status tells the user after such a search ("a resume with a larger --budget pays for one") holds."""
    from allocsearch.search.budget import Budget
    from allocsearch.study.folder import Study

    def confirmation_runs(ctl):
        return [t for t in ctl.store.trials() if t.user_attrs.get("confirm") is not None]

    ctl, _ = search(tmp_path, budget="2cpu-min", confirm=0.2)
    assert ctl.reserve.phase == "search, reserve released" and not confirmation_runs(ctl)
    status = render_summary(analysis.summarize(ctl.study.root), final=True)
    assert "the search ran no confirmation run: a resume with a larger --budget pays for one" in status
    Study.open(tmp_path, "s").save_settings(budget=Budget.parse("12cpu-min").to_dict())
    ctl, _ = search(tmp_path, confirm=0.2)
    assert confirmation_runs(ctl)


def test_a_reserve_the_prior_says_is_too_small_goes_before_the_first_trials_caps_are_set(tmp_path):
    # the cost prior guesses 40 s a trial: a 20% reserve of 2 CPU-min (24 s) cannot pay for one (40 x 1.2).
    # The first trial, admitted before any is seen, gets its cap from the whole budget, not from the 96 s
    # left beside the reserve (the replay at 10% of the grid: a trial cut 1.3 s before its end by a reserve
    # that was released unused once two trials were seen)
    ctl = make(tmp_path, budget="2cpu-min", scheduler="none", confirm=0.2)
    ctl.cost.predict = lambda features: 40.0
    assert ctl.keeper.held == pytest.approx(24.0)
    events = []
    ctl.emit = lambda kind, **data: events.append((kind, data))
    first = ctl.propose()
    assert ctl.keeper.held == 0.0 and ctl.reserve.phase == "search, reserve released"
    # the user is told what budget would pay for one: its 20% reserve covers 40 s x margin 1.2 at 4 CPU-min
    (kind, data), = [e for e in events if e[0] == "confirming"]
    assert data["needed_budget"] == pytest.approx(240.0)
    view = LiveView(stream=io.StringIO())
    view.event("study", budget=ctl.study.settings["budget"], spent=0.0, study="s", root="r")
    view.event(kind, **data)
    out = view.stream.getvalue()
    assert "single-seed pick" in out and "about 4.00 CPU-min pays for a confirmation run" in out, out
    assert ctl.running[first.number].predicted * ctl.keeper.room > 120.0  # room to use it all
    assert first.cap_wall_seconds == pytest.approx(120.0)
    # a reserve that can pay for one whole run is held
    ctl = make(tmp_path, budget="6cpu-min", scheduler="none", confirm=0.2, name="big")
    ctl.cost.predict = lambda features: 40.0
    ctl.propose()
    assert ctl.keeper.held == pytest.approx(72.0) and ctl.reserve.phase == "search"


def test_a_configuration_drawn_again_runs_on_the_next_seed(tmp_path):
    clock = Clock()
    ctl = make(tmp_path, clock=clock, scheduler="none", priors=False)
    params = {"method": "lora", "lora.rank": 2, "lr": 1e-3}
    for _ in range(3):
        ctl.store.enqueue(params)
    seeds = []
    for _ in range(3):
        config = ctl.propose()
        ctl.on_start(config.number)
        clock.t += 10
        ctl.on_complete(config.number, final(objective=0.8), error=False)
        seeds.append(config.spec["train"]["seed"])
    assert seeds == [0, 1, 2]


def test_the_dashboard_shows_how_sure_the_winner_is(tmp_path):
    pytest.importorskip("streamlit")
    pytest.importorskip("plotly")
    from test_dashboard import charts, clean, open_app, shown

    ctl, _ = search(tmp_path, confirm=0.3)
    ev = analysis.summarize(ctl.study.root)["evidence"]
    at = clean(open_app(tmp_path, study=ctl.study.name))
    assert "How sure is the winner?" in shown(at)
    assert any("Finalists: mean +- 95% CI" in t for t in charts(at))
    table = next(d.value for d in at.dataframe if "ci95" in d.value.columns)
    assert list(table["mark"])[0] == "winner" and list(table["n"])[0] == ev["winner"]["n"]
    assert list(table["mean"])[0] == pytest.approx(ev["winner"]["mean"])


def test_a_resumed_search_s_rungs_go_on_from_its_records(tmp_path):
    from test_search_controller import make as make_ctl

    from allocsearch.search.ray.executor import make_scheduler
    from allocsearch.search.rungs import Rungs, spearman

    # trials with checkpoints at steps 2, 4, 6 (the test space trains 8 steps): four complete, one pruned
    clock = Clock()
    ctl = make_ctl(tmp_path, clock=clock, priors=False)
    live = Rungs(8, 2, 2, 0.0, min_pairs=3)
    for i, (curve, end) in enumerate([((0.60, 0.70, 0.75), 0.80), ((0.55, 0.65, 0.70), 0.74),
                                      ((0.50, 0.60, 0.66), 0.70), ((0.65, 0.72, 0.78), 0.82), ((0.40,), None)]):
        config = ctl.propose()
        n = config.number
        ctl.on_start(n)
        for step, value in zip((2, 4, 6), curve):
            clock.t += 1.0
            ctl.on_result(n, {"step": step, "objective": value, "train_seconds": 1.0})
            live.stop(n, step, value)
        if end is None:
            ctl.on_complete(n, {"step": 2, "objective": 0.40, "final": True, "status": "stopped", "steps": 2,
                                "trainable_params": 1, "result_json": None}, error=False)
        else:
            ctl.on_complete(n, final(objective=end), error=False)
            live.final(n, end)
    plan = ctl.schedule("asha")
    history = plan["history"]
    assert sorted(h[0] for h in history) == [0, 1, 2, 3, 4] and [h[2] for h in history].count(None) == 1
    resumed = make_scheduler(plan).rungs  # what Tune gets on a resume
    assert resumed.milestones == live.milestones and resumed.min_pairs == 5
    for m in live.milestones:  # the same records at every rung, so the same cutoffs and the same evidence
        assert sorted(resumed.recorded[m].values()) == sorted(live.recorded[m].values())
    assert sorted(resumed.finals.values()) == [0.70, 0.74, 0.80, 0.82]
    resumed.min_pairs = live.min_pairs = 3
    assert [resumed.trusted(m) for m in live.milestones] == [live.trusted(m) for m in live.milestones]
    assert resumed.trusted(2) and resumed.stop("new", 2, 0.30) is True  # the rung earned its trust before
    # status reads the same records: its Spearman per rung is the one the scheduler decides on
    rungs = analysis.summarize(ctl.study.root)["rungs"]
    pairs = [(resumed.recorded[2][k], v) for k, v in resumed.finals.items()]
    assert rungs[0]["step"] == 2 and rungs[0]["n"] == 4 and rungs[0]["rho"] == pytest.approx(spearman(pairs))


def test_the_race_goes_on_with_the_finalist_whose_whole_run_still_fits_and_says_why_it_ended(tmp_path):
    """Two finalists, LoRA (20 s a run) and MoLA (60 s): once MoLA's next whole run (60 s x margin 1.2) no
    longer fits, the budget left still pays for LoRA's, which runs; the end reason's numbers agree (what is
    left is less than what the cheapest next run needs)."""
    import re

    clock = Clock()
    ctl = make(tmp_path, budget="4cpu-min", clock=clock, scheduler="none", priors=False, confirm=0.5)
    lora, mola = ({"method": "lora", "lora.rank": 2, "lr": 1e-3},
                  {"method": "mola", "mola.experts": 2, "mola.top_k": 1, "mola.rank": 2, "lr": 1e-3})
    seconds = {"lora": 20.0, "mola": 60.0}
    for params in (lora, mola):
        ctl.store.enqueue(params)
    ran = []
    while (launch := ctl.propose()) not in ("finished", None):
        method = launch.spec["allocation"]["method"]
        ctl.on_start(launch.number)
        clock.t += seconds[method]
        ctl.on_complete(launch.number, final(objective=0.80 if method == "lora" else 0.79,
                                             train_seconds=seconds[method] - 5.0), error=False)
        ran.append((launch.number, method, launch.confirm))
    trials = {t.number: t for t in ctl.store.trials()}
    skipped = [n for n, t in trials.items() if t.user_attrs.get("state") == "not_run"
               and t.user_attrs.get("confirm") is not None and t.params["method"] == "mola"]
    assert skipped, ran  # MoLA's next whole run no longer fit ...
    assert [n for n, method, confirm in ran if confirm and method == "lora" and n > skipped[0]], ran  # LoRA's did
    reason = ctl.end_reason
    assert reason.startswith("confirmation ended: no finalist's next whole run fits"), reason
    left, need = (float(x) for x in re.findall(r"([0-9.]+) CPU-min", reason)[:2])
    assert left < need, reason  # the numbers agree with the decision
    assert "nothing more fits" not in reason and "spent)" not in reason
