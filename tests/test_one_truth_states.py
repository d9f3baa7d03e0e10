"""One truth for every trial, not only the best: a real search (tiny-llama, real Ray, real trials) whose grid
holds a learning rate that diverges (1e30: NaN at step 2, the trial fails), then each trial's state and
score read from every place a user or a tool looks: Optuna's storage, the trial's results.json, MLflow's
nested run, `start --json`, `status --json` and the dashboard's Trials page. A second search forces a
stopped (pruned) trial: one configuration of 5,000 steps under a budget of 18 device-seconds, admitted cut
(its first checkpoint fits, its whole run does not), which its budget stops."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_one_truth import dashboard, trials_table  # the dashboard under AppTest, its Trials table
from test_search_e2e import cli  # `python3 -m allocsearch ...` in a subprocess (the e2e tests' helper)

pytestmark = pytest.mark.slow

SPACE = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 32, validation: 16, test: 16}]}
train: {steps: 8, batch_size: 4, max_length: 64, eval_every: 4, eval_examples: 16, schedule: constant,
        lr: {choice: [3.0e-3, 1.0e+30]}}
methods:
  lora: {rank: {choice: [2, 4]}}
"""
CUT_SPACE = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 32, validation: 16, test: 16}]}
train: {steps: 5000, batch_size: 4, max_length: 64, eval_every: 50, eval_examples: 16, schedule: constant,
        lr: 3.0e-3}
methods:
  lora: {rank: 2}
"""
SEARCHES = {"diverging": (SPACE, "2cpu-min", {"failed", "completed"}), "cut": (CUT_SPACE, "0.3cpu-min", {"pruned"})}
OPTUNA = {"COMPLETE": "completed", "FAIL": "failed", "PRUNED": "pruned"}  # what each state is stored as
RESULTS = {"completed": "completed", "failed": "failed", "stopped": "pruned"}  # a worker's results.json status


@pytest.fixture(scope="module", params=list(SEARCHES))
def searched(request, tmp_path_factory) -> tuple[Path, dict]:
    space, budget, expected = SEARCHES[request.param]
    tmp = tmp_path_factory.mktemp("states")
    (tmp / "space.yaml").write_text(space)
    out = cli("start", "--budget", budget, "--space", str(tmp / "space.yaml"), "--workdir", str(tmp / "runs"),
              "--study", "states", "--sampler", "grid", "--confirm", "off", "--json", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    states = {t["state"] for t in summary["trials"]}
    assert expected <= states, states  # the grid ran both learning rates; the budget stopped the long trial
    return tmp / "runs" / "states", summary


def same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9))


def test_every_trial_reads_the_same_in_optuna_results_json_status_and_start(searched):
    import optuna

    root, summary = searched
    trials = {t["number"]: t for t in summary["trials"] if t["state"] not in ("not_run", "queued")}
    status = cli("status", "--workdir", str(root.parent), "--study", "states", "--json")
    assert status.returncode == 0, status.stderr
    shown = {t["number"]: t for t in json.loads(status.stdout)["trials"]}
    study = optuna.load_study(study_name="states", storage=f"sqlite:///{root / 'optuna.db'}")
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    for n, t in trials.items():
        assert shown[n]["state"] == t["state"] and same(shown[n]["objective"], t["objective"]), n
        assert OPTUNA[stored[n].state.name] == t["state"], n
        # a pruned trial's value in Optuna is its last intermediate value (Optuna's tell for PRUNED), the score
        # every other view gives it; a failed trial has none
        assert same(stored[n].value, None if t["state"] == "failed" else t["objective"]), n
        results = json.loads((root / "trials" / f"{n:04d}" / "results.json").read_text())
        assert RESULTS[results["status"]] == t["state"], n
        measured = (results.get("validation") or {}).get("macro_balanced_accuracy")
        if t["state"] == "completed":
            assert same(measured, t["objective"]), n
        if t["state"] == "failed":
            assert measured is None and results["failure"] and t["reason"] == results["failure"], n
        if t["state"] == "pruned":  # its score is its last checkpoint, as the worker wrote it; none when the
            # budget stopped it before its first (its worker's start took the cap on a busy machine)
            last = results["checkpoints"][-1]["metrics"]["macro_balanced_accuracy"] if results["checkpoints"] else None
            assert same(last, t["objective"]), n


def test_every_trial_reads_the_same_in_mlflow(searched):
    from mlflow import MlflowClient

    root, summary = searched
    state = json.loads((root / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("allocsearch")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    by_number = {int(r.data.tags["trial_number"]): r for r in runs}
    for t in summary["trials"]:
        if t["state"] in ("not_run", "queued"):
            continue
        run = by_number[t["number"]]
        assert run.data.tags["state"] == t["state"], t["number"]
        assert run.info.status == ("FAILED" if t["state"] == "failed" else "FINISHED"), t["number"]
        assert same(run.data.metrics.get("objective"), t["objective"]), t["number"]
        if t["state"] == "failed":
            assert run.data.tags["failure"] == t["reason"], t["number"]


def test_every_trial_reads_the_same_on_the_dashboard(searched):
    pytest.importorskip("streamlit")
    root, summary = searched
    table = trials_table(dashboard(root))
    rows = {int(n): (s, o) for n, s, o in zip(table["number"], table["state"], table["objective"])}
    for t in summary["trials"]:
        s, o = rows[t["number"]]
        assert s == t["state"], t["number"]
        assert same(None if o != o else o, t["objective"]), t["number"]  # NaN: the table's empty cell
