"""Which configuration a study exports (allocsearch.study.choice): the confirmed winner, or with --prefer
cheapest the one with the fewest trainable parameters among those tied with it on at least two seeds; the
rule as status, export and the replay apply it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_search_controller import Clock, final, make

from allocsearch.bench.replay import replay
from allocsearch.study.choice import best_of
from allocsearch.study.records import TrialRecord

BIG, SMALL, TINY, MICRO = {"c": "big"}, {"c": "small"}, {"c": "tiny"}, {"c": "micro"}
PARAMS = {"big": 300_000, "small": 75_000, "tiny": 10_000, "micro": 5_000}


def run(number, params, seed, value, confirm=None, trainable=None, train_seconds=8.0):
    return TrialRecord(number, "completed", value, params, seed=seed, confirm_of=confirm, steps=8,
                       trainable_params=PARAMS[params["c"]] if trainable is None else trainable,
                       train_seconds=train_seconds)


def study(extra=()):
    """big: the winner, raced on 3 seeds; small: tied with it on 3 seeds; tiny: one run, tied by noise only;
    micro: 3 seeds, clearly worse."""
    rows = [run(0, BIG, 0, 0.84), run(1, SMALL, 0, 0.83), run(2, TINY, 0, 0.835), run(3, MICRO, 0, 0.70),
            run(4, BIG, 1, 0.85, confirm=0), run(5, SMALL, 1, 0.84, confirm=1), run(6, MICRO, 1, 0.71, confirm=3),
            run(7, BIG, 2, 0.83, confirm=0), run(8, SMALL, 2, 0.835, confirm=1), run(9, MICRO, 2, 0.69, confirm=3)]
    return rows + list(extra)


def test_the_cheapest_is_the_fewest_parameters_among_those_tied_on_two_seeds():
    rows = study()
    best, cheap = best_of(rows, 0.01), best_of(rows, 0.01, "cheapest")
    assert best.params == BIG and best.n == 3 and best.trainable_params == 300_000 and best.prefer == "best"
    # small is tied on three seeds and 4x smaller; tiny (one run) and micro (separated) are never picked
    assert cheap.params == SMALL and cheap.n == 3 and cheap.trainable_params == 75_000
    assert cheap.value == pytest.approx((0.83 + 0.84 + 0.835) / 3) and cheap.trial == 1 and cheap.prefer == "cheapest"
    assert cheap.step_seconds == pytest.approx(1.0)


def test_a_few_percent_smaller_does_not_replace_the_winner():
    near = [TrialRecord(r.number, r.state, r.objective, r.params, seed=r.seed, confirm_of=r.confirm_of, steps=8,
                        trainable_params=285_000 if r.params == SMALL else PARAMS[r.params["c"]], train_seconds=8.0)
            for r in study()]
    assert best_of(near, 0.01, "cheapest").params == BIG  # 5% fewer parameters: not worth a worse mean
    tenth = [TrialRecord(r.number, r.state, r.objective, r.params, seed=r.seed, confirm_of=r.confirm_of, steps=8,
                         trainable_params=270_000 if r.params == SMALL else PARAMS[r.params["c"]], train_seconds=8.0)
             for r in study()]
    assert best_of(tenth, 0.01, "cheapest").params == SMALL  # 10%: it is


def test_equal_sizes_go_to_the_faster_step_then_to_the_winner():
    same = [TrialRecord(r.number, r.state, r.objective, r.params, seed=r.seed, confirm_of=r.confirm_of, steps=8,
                        trainable_params=300_000, train_seconds=4.0 if r.params == SMALL else 8.0) for r in study()]
    assert best_of(same, 0.01, "cheapest").params == SMALL  # as large, but twice as fast a step
    unknown = [TrialRecord(r.number, r.state, r.objective, r.params, seed=r.seed, confirm_of=r.confirm_of)
               for r in study()]
    assert best_of(unknown, 0.01, "cheapest").params == BIG  # nothing known of their cost: the winner
    with pytest.raises(ValueError, match="prefer must be one of best, cheapest"):
        best_of(study(), 0.01, "smallest")
    assert best_of([], 0.01, "cheapest") is None


def _search(tmp_path, prefer):
    """A study driven through the controller: MoLA (the best mean, 2.4 M parameters) against a LoRA tied
    with it (0.3 M), both raced on fresh seeds."""
    clock = Clock()
    ctl = make(tmp_path, budget="6cpu-min", clock=clock, scheduler="none", priors=False, confirm=0.5,
               prefer=prefer, name=f"s-{prefer}")
    lora, mola = ({"method": "lora", "lora.rank": 2, "lr": 1e-3},
                  {"method": "mola", "mola.experts": 2, "mola.top_k": 1, "mola.rank": 2, "lr": 1e-3})
    for params in (mola, lora):
        ctl.store.enqueue(params)
    scores = {("mola", 0): 0.832, ("mola", 1): 0.828, ("mola", 2): 0.830, ("lora", 0): 0.829, ("lora", 1): 0.827,
              ("lora", 2): 0.826}
    while (launch := ctl.propose()) not in ("finished", None):
        method = launch.spec["allocation"]["method"]
        seed = launch.spec["train"]["seed"]
        ctl.on_start(launch.number)
        clock.t += 20.0
        end = final(objective=scores.get((method, seed), 0.60), train_seconds=16.0)
        end["trainable_params"] = 2_400_000 if method == "mola" else 300_000
        ctl.on_complete(launch.number, end, error=False)
    ctl.close()
    return ctl


def test_status_shows_both_and_export_follows_the_preference(tmp_path, capsys):
    from conftest import run_cli

    from allocsearch.cli.search_view import render_summary
    from allocsearch.reports.export import export_trial
    from allocsearch.reports.status import summarize

    ctl = _search(tmp_path, "best")
    s = summarize(ctl.study.root)
    best, cheap = s["best"], s["cheapest"]
    assert best["summary"].startswith("mola") and cheap["summary"].startswith("lora") and cheap["n"] >= 2
    text = render_summary(s, final=True)
    assert f"cheapest trial {cheap['trial']}: {cheap['value']:.4f}" in text and "0.30M trainable" in text
    assert "2.40M trainable" in text and "--prefer cheapest exports it" in text
    # the same study asked for the cheapest: the best is the LoRA, and the winner is named beside it
    again = summarize(ctl.study.root, prefer="cheapest")
    assert again["best"] == {**cheap, "prefer": "cheapest"} and again["prefer"] == "cheapest"
    assert "--prefer best" in render_summary(again, final=True)
    code, out, _ = run_cli(capsys, "status", "--workdir", str(tmp_path), "--study", ctl.study.name, "--prefer",
                           "cheapest", "--json")
    assert code == 0 and json.loads(out)["best"]["trial"] == cheap["trial"]
    doc = yaml.safe_load(export_trial(ctl.study.root, cheap["trial"], prefer="cheapest"))
    assert doc["provenance"]["best"]["trial"] == cheap["trial"] and doc["allocation"]["method"] == "lora"
    out_file = tmp_path / "small.yaml"
    code, out, err = run_cli(capsys, "export", "--workdir", str(tmp_path), "--study", ctl.study.name, "--best",
                             "--prefer", "cheapest", "--out", str(out_file))
    assert code == 0, err
    assert yaml.safe_load(out_file.read_text())["provenance"]["trial"] == cheap["trial"]


def test_a_study_started_with_prefer_cheapest_names_the_cheapest_everywhere(tmp_path):
    from allocsearch.reports.status import summarize

    ctl = _search(tmp_path, "cheapest")
    s = summarize(ctl.study.root)
    assert s["prefer"] == "cheapest" and s["best"]["summary"].startswith("lora") and s["best"]["n"] >= 2
    assert s["best"]["trial"] == s["cheapest"]["trial"]
    from allocsearch.tracking.data import summary_metrics  # what MLflow's parent run gets at the end

    metrics, tags = summary_metrics(s, 0)
    assert {k: v for k, v, _, _ in metrics}["best.trial"] == s["best"]["trial"]
    assert tags["best.trials"] == ",".join(map(str, s["best"]["trials"]))


def test_the_replay_exports_the_cheapest_of_the_same_search():
    """default-cheapest runs the very search default runs (same trials, seed for seed) on a recorded table;
    only the export differs: never larger than default's, smaller where a cheaper configuration was tied."""
    from allocsearch.bench.table import Table

    table = Table.load(Path(__file__).resolve().parents[1] / "benchmarks" / "sst2-minilm")
    budget, smaller = 0.5 * table.grid_seconds(), 0
    for seed in range(6):
        d = replay(table, "default", budget_seconds=budget, seed=seed)
        c = replay(table, "default-cheapest", budget_seconds=budget, seed=seed)
        assert c.runs == d.runs and c.argmax == d.argmax
        size = {key: next(iter(table.runs[key].values())).trainable_params for key in (d.final, c.final)}
        assert size[c.final] <= size[d.final]
        smaller += size[c.final] < size[d.final]
    assert smaller >= 1


def test_the_dashboard_names_the_cheapest_beside_the_best(tmp_path):
    pytest.importorskip("streamlit")
    from test_dashboard import clean, open_app, shown

    from allocsearch.reports.status import summarize

    ctl = _search(tmp_path, "best")
    cheap = summarize(ctl.study.root)["cheapest"]
    at = clean(open_app(tmp_path, study=ctl.study.name))
    assert f"the cheapest configuration tied with it: #{cheap['trial']}" in shown(at)
    assert "300,000 trainable parameters against 2,400,000" in shown(at)


def test_a_trials_configuration_score_is_its_mean_over_every_seed_it_completed():
    from allocsearch.study.choice import configuration_score

    rows = study([TrialRecord(10, "pruned", None, BIG, seed=3, steps=4), TrialRecord(11, "failed", None, {})])
    # trial 4 confirms trial 0: both name the configuration's 3 completed seeds; the pruned run counts for nothing
    for number in (0, 4, 7, 10):
        value, n = configuration_score(rows, number)
        assert (round(value, 6), n) == (round((0.84 + 0.85 + 0.83) / 3, 6), 3)
    assert configuration_score(rows, 2) == (0.835, 1)
    assert configuration_score(rows, 11) is None  # no parameters
    assert configuration_score(rows, 99) is None  # no such trial
    assert configuration_score([TrialRecord(0, "pruned", None, BIG, seed=0, steps=4)], 0) is None  # none completed


def test_the_best_reads_as_a_mean_of_seeds_or_one_seed():
    best = best_of(study(), 0.01)
    assert best.label() == f"{(0.84 + 0.85 + 0.83) / 3:.4f} (mean of 3 seeds)"
    one = best_of([run(0, TINY, 0, 0.8123456)], 0.01)
    assert one.label() == "0.8123 (1 seed)"
    assert best.to_dict()["params"] == BIG and best.to_dict()["n"] == 3
