"""The read-only queries behind ``status`` and the dashboard (allocsearch.reports.status*), on fixture studies
built by driving the controller by hand; no Streamlit here."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dashboard_fixtures import shared_workdir

from allocsearch.reports import status as analysis

from allocsearch.reports import insight as analysis_insight

from allocsearch.reports import trial as analysis_trial
from allocsearch.study.folder import Study, StudyError


@pytest.fixture(scope="module")
def wd(tmp_path_factory) -> Path:
    return shared_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def numbers(wd) -> dict:
    trials = analysis.summarize(wd / "demo")["trials"]
    return {state: [t["number"] for t in trials if t["state"] == state] for state in analysis.STATE_ORDER}


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_status_keys_stay_as_they_were(wd):
    s = analysis.summarize(wd / "demo")
    assert {"study", "root", "model", "space", "objectives", "sampler", "scheduler", "budget", "counts", "trials",
            "best", "baseline", "controller_pid", "evidence"} <= set(s)
    assert set(s["trials"][0]) == {"number", "state", "objective", "values", "params", "summary", "prior",
                                   "retry_of", "spend", "predicted", "steps", "trainable_params", "reason",
                                   "experts", "intermediate", "start", "end", "seed", "confirm_of",
                                   "train_seconds"}
    assert set(s["best"]) == {"trial", "value", "n", "trials", "params", "summary", "experts", "trainable_params",
                              "step_seconds", "prefer"}
    assert s["prefer"] == "best" and s["cheapest"]["prefer"] == "cheapest"
    assert s["counts"]["completed"] == 6 and s["best"]["value"] == pytest.approx(0.82) and s["best"]["n"] == 1
    assert "pareto" in analysis.summarize(wd / "multi")


def test_every_folder_that_holds_a_study_is_listed_and_inspected(wd):
    names = analysis.study_dirs(wd)
    assert names == sorted(["badjson", "demo", "empty", "garbagedb", "half", "jsononly", "multi", "nodb"])
    assert Study.list(wd) == [n for n in names if n != "half"]  # status lists complete ones only
    expected = {"demo": "ok", "multi": "ok", "empty": "empty", "half": "half_written", "jsononly": "half_written",
                "badjson": "corrupt", "nodb": "corrupt", "garbagedb": "corrupt"}
    for name, status in expected.items():
        state = analysis.inspect_study(wd / name)
        assert state["status"] == status, (name, state)
        if status != "ok":
            assert state["message"] and "\n" not in state["message"] and name in state["message"]
    assert "optuna.db" in analysis.inspect_study(wd / "nodb")["message"]
    assert "not an sqlite database" in analysis.inspect_study(wd / "garbagedb")["message"]
    assert analysis.inspect_study(wd / "nothing")["status"] == "missing"
    assert analysis.study_dirs(wd / "nothing") == []


def test_an_empty_optuna_file_is_refused_not_written(tmp_path, wd):
    import shutil

    shutil.copytree(wd / "jsononly", tmp_path / "jsononly")
    (tmp_path / "jsononly" / "optuna.db").write_bytes(b"")
    with pytest.raises(StudyError, match="is empty"):
        analysis.load_records(Study.open(tmp_path, "jsononly"))
    assert (tmp_path / "jsononly" / "optuna.db").stat().st_size == 0


def test_the_queries_write_nothing(wd, numbers):
    before = _snapshot(wd)
    for name in analysis.study_dirs(wd):
        state = analysis.inspect_study(wd / name)
        if state["summary"]:
            analysis.spend_timeline(wd / name, state["summary"])
    analysis_insight.param_importance(wd / "demo", method="mola", pruned=True)
    summary = analysis.summarize(wd / "demo")
    for n in sum(numbers.values(), []):
        analysis_trial.trial_detail(wd / "demo", n, summary=summary)
    assert _snapshot(wd) == before


def test_spend_timeline_follows_the_ledger_and_falls_back_to_trial_times(wd, tmp_path):
    s = analysis.summarize(wd / "demo")
    tl = analysis.spend_timeline(wd / "demo", s)
    assert tl["source"] == "ledger" and tl["unit"] == "cpu" and tl["total"] == 1800.0
    spent = [p["spent"] for p in tl["points"]]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(s["budget"]["spent"])
    assert all(p["remaining"] == pytest.approx(max(0.0, 1800.0 - p["spent"])) for p in tl["points"])
    import shutil

    shutil.copytree(wd / "demo", tmp_path / "demo")  # an older ledger without timestamps
    ledger = tmp_path / "demo" / "ledger.jsonl"
    recs = [json.loads(line) for line in ledger.read_text().splitlines()]
    ledger.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "time"}) + "\n" for r in recs))
    tl2 = analysis.spend_timeline(tmp_path / "demo")
    assert tl2["source"] == "trials" and len(tl2["points"]) == 8  # one per ended trial
    ended = sum(t["spend"] for t in s["trials"] if t["end"])
    assert tl2["points"][-1]["spent"] == pytest.approx(ended)


def test_anytime_curve_running_now_and_table(wd, numbers):
    s = analysis.summarize(wd / "demo")
    curve = analysis.anytime_curve(analysis.records_in(s))
    assert [p["number"] for p in curve] == sorted(numbers["completed"] + numbers["pruned"] + numbers["failed"])
    best = [p["best"] for p in curve]
    assert best == sorted(best) and best[-1] == pytest.approx(0.82)
    xs = [p["device_seconds"] for p in curve]
    assert xs == sorted(xs) and xs[-1] == pytest.approx(sum(t["spend"] for t in s["trials"] if t["end"]))
    now = analysis.running_now(s)
    assert [r["number"] for r in now] == numbers["running"]
    assert now[0]["last_step"] == 2 and now[0]["last_objective"] == pytest.approx(0.6) and now[0]["spend"] > 0
    rows = analysis.trials_table(s["trials"], s["objectives"])
    assert len(rows) == len(s["trials"]) and {"mola.shape", "mola.per_layer", "lora.rank"} <= set().union(*rows)
    assert all(r["seed"] == 0 and r["confirms"] is None for r in rows)  # each run's seed; none is a confirmation
    assert {r["method"] for r in rows} == {"mola", "lora"}
    multi = analysis.summarize(wd / "multi")
    assert "trainable_params" in analysis.trials_table(multi["trials"], multi["objectives"])[0]
    assert analysis.controller_pid(wd / "demo") is None and analysis.controller_pid(wd / "badjson") is None


def test_trial_detail_of_a_completed_trial(wd, numbers):
    n = numbers["completed"][0]
    d = analysis_trial.trial_detail(wd / "demo", n)
    row = d["row"]
    assert row["state"] == "completed" and not d["notes"] and d["config"]["name"] == f"trial-{n:04d}"
    assert [r["experts"] for r in d["allocation"]["layers"]] == row["experts"]
    assert d["allocation"]["method"] == "mola" and len(d["losses"]) == 8
    macro = [c for c in d["checkpoints"] if c["task"] == "macro"]
    assert [c["step"] for c in macro] == [2, 4, 6, 8]
    assert {c["task"] for c in d["checkpoints"]} == {"macro", "sst2", "rte"}
    load = d["load"]
    multi = [j for j, e in enumerate(row["experts"]) if e > 1]
    assert load["layers"] == multi and load["max_experts"] == max(row["experts"])
    assert load["targets"] == ["q_proj", "v_proj"]
    for j, cells in zip(load["layers"], load["mean"]):
        assert sum(c for c in cells if c is not None) == pytest.approx(1.0)
        assert sum(c is not None for c in cells) == row["experts"][j]
    assert [r["layer"] for r in d["redundancy"]] == multi
    assert {(r["split"], r["task"]) for r in d["scores"]} >= {("validation", "sst2"), ("test", "macro")}
    assert d["cost"]["peak_memory_mb"] == 812.5 and d["cost"]["ledger_device_seconds"] == pytest.approx(row["spend"])


def test_trial_detail_of_failed_running_and_damaged_trials(wd, numbers, tmp_path):
    failed = analysis_trial.trial_detail(wd / "demo", numbers["failed"][0])
    assert failed["result"] is None and "no results.json" in failed["notes"][0]
    assert failed["allocation"]["layers"] and failed["losses"] == [] and failed["load"] is None
    running = analysis_trial.trial_detail(wd / "demo", numbers["running"][0])
    assert running["notes"] == ["no results.json yet: the trial is running"]
    import shutil

    shutil.copytree(wd / "demo", tmp_path / "demo")
    n = numbers["completed"][1]
    folder = tmp_path / "demo" / "trials" / f"{n:04d}"
    (folder / "results.json").write_text("{ torn")
    (folder / "trial.yaml").write_text("model: [unclosed")
    d = analysis_trial.trial_detail(tmp_path / "demo", n)
    assert len(d["notes"]) == 2 and "results.json cannot be read" in d["notes"][1]
    assert d["config_text"] == "model: [unclosed" and d["config"] is None
    assert [r["experts"] for r in d["allocation"]["layers"]] == d["row"]["experts"]  # from the study
    missing = analysis_trial.trial_detail(tmp_path / "demo", 999)
    assert missing["row"] is None and missing["allocation"] is None and "no trial.yaml" in missing["notes"][0]
    assert analysis_trial.trial_signature(tmp_path / "demo", n) != analysis_trial.trial_signature(wd / "demo", n)


def test_allocation_layers_resolves_specs_without_torch():
    shape = analysis_trial.allocation_layers({"method": "mola", "shape": "inverted_triangle", "top_k": 2,
                                              "rank": 8, "total_experts": 20}, num_layers=4)
    experts = [r["experts"] for r in shape["layers"]]
    assert experts == sorted(experts) and sum(experts) == 20 and shape["source"] == "resolved"
    assert [r["rank"] for r in shape["layers"]] == [8] * 4
    assert analysis_trial.allocation_layers(None, experts=[1, 2])["layers"][1]["experts"] == 2
    assert analysis_trial.allocation_layers({"method": "nope"}, num_layers=4) is None


def test_parameter_importance(wd):
    mola = analysis_insight.param_importance(wd / "demo", method="mola")
    assert mola["message"] is None and mola["n"] == 5
    assert set(mola["importances"]) <= {"lr", "mola.shape", "mola.per_layer", "mola.top_k", "mola.rank"}
    assert sum(mola["importances"].values()) == pytest.approx(1.0)
    assert analysis_insight.param_importance(wd / "demo", method="mola", pruned=True)["n"] == 6
    few = analysis_insight.param_importance(wd / "demo", method="lora")
    assert few["importances"] == {} and "at least 3" in few["message"]
    broken = analysis_insight.param_importance(wd / "garbagedb")
    assert broken["importances"] == {} and "not an sqlite database" in broken["message"]


def test_parallel_slices_allocation_map_and_pareto(wd):
    s = analysis.summarize(wd / "demo")
    rows = analysis_insight.scored(s["trials"], method="mola")
    dims = analysis_insight.parallel_dims(rows)
    assert dims[-1]["label"] == "objective" and dims[-1]["values"] == [t["objective"] for t in rows]
    shape = next(d for d in dims if d["label"] == "mola.shape")
    assert shape["ticktext"] == sorted({t["params"]["mola.shape"] for t in rows})
    all_dims = [d["label"] for d in analysis_insight.parallel_dims(analysis_insight.scored(s["trials"]))]
    assert "mola.shape" not in all_dims and "method" in all_dims  # only what every trial has
    assert len(analysis_insight.slice_points(s["trials"], "mola.per_layer")) == 6  # 5 completed + 1 pruned
    amap = analysis_insight.allocation_map(s["trials"])
    assert (amap["shape_param"], amap["size_param"]) == ("mola.shape", "mola.per_layer")
    i, j = amap["shapes"].index("triangle"), amap["sizes"].index(3)
    assert amap["best"][i][j] == pytest.approx(0.82) and amap["count"][i][j] == 2
    assert amap["mean"][i][j] == pytest.approx(0.80)
    assert analysis_insight.allocation_map([t for t in s["trials"] if t["params"].get("method") == "lora"]) is None
    pref = analysis_insight.layer_preference(s["trials"])
    assert pref["layers"] == [0, 1, 2, 3] and pref["rows"][0]["objective"] == pytest.approx(0.82)
    assert pref["correlation"][0] > 0 > pref["correlation"][3]  # the best trials put experts at the input
    multi = analysis.summarize(wd / "multi")
    front = analysis_insight.pareto_points(multi)
    assert sorted(p["number"] for p in front["points"] if p["front"]) == [0, 1]
    assert analysis_insight.pareto_points(s) is None
    assert analysis_insight.methods_of(s["trials"]) == ["lora", "mola"]


def test_ledger_unreadable_lines_do_not_break_the_timeline(wd, tmp_path):
    import shutil

    shutil.copytree(wd / "demo", tmp_path / "demo")
    with open(tmp_path / "demo" / "ledger.jsonl", "a") as fh:
        fh.write('{"kind": "trial", "torn')
    assert analysis.spend_timeline(tmp_path / "demo")["source"] == "ledger"
    assert os.path.getsize(tmp_path / "demo" / "ledger.jsonl") > 0
