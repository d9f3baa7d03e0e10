"""One truth on a real search with a confirmation phase: `allocsearch start` (tiny-llama, real Ray, real
trials, two configurations raced on fresh seeds), then every place a user looks names the same best trial
with the same value and number of seeds: MLflow's best metric (after every trial's end, and at the end),
`status --json` and its text, the dashboard (its Studies and Trials pages under AppTest) and
`export --best`; the dashboard's trials table shows each run's seed and the configuration it confirms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_search_e2e import cli  # `python3 -m allocsearch ...` in a subprocess (the e2e tests' helper)

pytestmark = pytest.mark.slow

# two configurations at one learning rate, so the confirmation race re-runs both on fresh seeds
SPACE = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 32, validation: 16, test: 16}]}
train: {steps: 8, batch_size: 4, max_length: 64, eval_every: 4, eval_examples: 16, lr: {choice: [3.0e-3]}}
methods:
  lora: {rank: {choice: [2, 4]}}
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("truth")
    (tmp / "space.yaml").write_text(SPACE)
    out = cli("start", "--budget", "1cpu-min", "--space", str(tmp / "space.yaml"), "--workdir", str(tmp / "runs"),
              "--study", "truth", "--confirm", "0.5", "--json", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    best = summary["best"]
    confirm = [t for t in summary["trials"] if t["confirm_of"] is not None and t["state"] == "completed"]
    assert confirm and best is not None, out.stderr[-3000:]  # the search raced its finalists
    return tmp / "runs" / "truth", summary


def test_the_best_is_a_mean_over_seeds_and_status_says_so(searched):
    root, summary = searched
    best = summary["best"]
    assert best["n"] >= 2 and len(best["trials"]) == best["n"] and best["trial"] == min(best["trials"])
    runs = {t["number"]: t for t in summary["trials"]}
    scores = [runs[n]["objective"] for n in best["trials"]]
    assert best["value"] == pytest.approx(sum(scores) / len(scores))
    assert {json.dumps(runs[n]["params"], sort_keys=True) for n in best["trials"]} == {json.dumps(best["params"],
                                                                                                  sort_keys=True)}
    status = cli("status", "--workdir", str(root.parent), "--study", "truth", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["best"] == best
    text = cli("status", "--workdir", str(root.parent), "--study", "truth").stdout
    assert f"best    trial {best['trial']}: {best['value']:.4f} (mean of {best['n']} seeds)" in text


def test_mlflow_logs_the_same_best_live_and_at_the_end(searched):
    from mlflow import MlflowClient

    from allocsearch.study.choice import best_of
    from allocsearch.study.records import TrialRecord

    root, summary = searched
    best = summary["best"]
    state = json.loads((root / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    metrics, tags = parent.data.metrics, parent.data.tags
    assert metrics["best.objective"] == pytest.approx(best["value"])
    assert metrics["best.trial"] == best["trial"] and metrics["best.seeds"] == best["n"]
    assert tags["best.trial"] == str(best["trial"]) and tags["best.trials"] == ",".join(map(str, best["trials"]))
    assert not {"best_objective", "winner.mean"} & set(metrics)  # one name, live and final
    # live: after each trial's end, the best of the trials ended by then (as status would have shown it)
    records = [TrialRecord(**t) for t in summary["trials"]]
    ended = sorted((r for r in records if r.end and r.state not in ("running", "queued")), key=lambda r: r.end)
    history = {}
    for m in client.get_metric_history(parent.info.run_id, "best.objective"):
        history.setdefault(m.step, []).append(m)
    checked = 0
    for i, r in enumerate(ended):
        if r.number not in history or r.state == "not_run":
            continue
        then = best_of(ended[:i + 1])
        live = min(history[r.number], key=lambda m: m.timestamp).value  # the final value shares the last step
        assert live == pytest.approx(then.value), (r.number, live, then)
        checked += 1
    assert checked >= 4


def dashboard(root: Path):
    """The dashboard (under AppTest) opened on the study folder ``root``, its first page run without an error."""
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "dashboard" / "streamlit_app.py"
    at = AppTest.from_file(str(app), default_timeout=120)
    at.session_state["workdir"], at.session_state["study"] = str(root.parent), root.name
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def trials_table(at):
    """The dashboard's Trials page table (a DataFrame), the page run without an error."""
    at.switch_page("app_pages/trials.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at.dataframe[0].value


def test_the_dashboard_shows_the_same_best_and_each_runs_seed(searched):
    pytest.importorskip("streamlit")
    root, summary = searched
    best = summary["best"]
    at = dashboard(root)
    shown = {m.label: (m.value, m.proto.delta) for m in at.metric}
    assert shown["Best objective"] == (f"{best['value']:.4f}", f"trial {best['trial']}, mean of {best['n']} seeds")
    table = trials_table(at)
    rows = {int(n): (seed, confirms) for n, seed, confirms in zip(table["number"], table["seed"], table["confirms"])}
    for t in summary["trials"]:
        seed, confirms = rows[t["number"]]
        assert seed == t["seed"]
        assert (confirms != confirms or confirms is None) if t["confirm_of"] is None else confirms == t["confirm_of"]


def test_export_best_writes_the_same_trial_with_its_evidence(searched, tmp_path):
    root, summary = searched
    best = summary["best"]
    out = cli("export", "--workdir", str(root.parent), "--study", "truth", "--best", "--out", str(tmp_path / "b.yaml"))
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load((tmp_path / "b.yaml").read_text())
    prov = doc["provenance"]
    assert prov["trial"] == best["trial"] and prov["best"] == best
    assert prov["evidence"]["is_winner"] and prov["evidence"]["this"]["n"] == best["n"]
    assert prov["evidence"]["this"]["mean"] == pytest.approx(best["value"])
