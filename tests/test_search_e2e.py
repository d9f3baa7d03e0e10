"""Real searches: `allocsearch start` on tiny-llama with real Ray, once on a local Ray the command starts
(with the shared datasets), once through `--ray-address` on a one-node cluster started here on loopback
(and resumed there with a bigger budget), then `status` and `stop` on what they left."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATASETS

pytest.importorskip("ray.tune")
pytestmark = pytest.mark.slow

SPACE = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 32, validation: 16, test: 16}]}
train: {steps: 8, batch_size: 4, max_length: 64, eval_every: 2, eval_examples: 16, lr: {float: [1.0e-4, 1.0e-2], log: true}}
methods:
  mola: {experts: {shape: {choice: [rectangle, inverted_triangle]}, per_layer: {int: [1, 3]}}, top_k: {int: [1, 2]}, rank: {choice: [2, 4]}}
  lora: {rank: {choice: [2, 4]}}
"""


def cli(*args, timeout=300, env=None):
    full = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "allocsearch", *args], capture_output=True, text=True,
                          timeout=timeout, env=full)


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(SPACE)
    return path


def check_study(summary: dict, budget_seconds: float):
    root = Path(summary["root"])
    trials = summary["trials"]
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers))
    assert summary["budget"]["spent"] <= 1.01 * budget_seconds
    done = [t for t in trials if t["state"] in ("completed", "pruned")]
    assert len(done) >= 2
    for t in done:
        result = json.loads((root / "trials" / f"{t['number']:04d}" / "results.json").read_text())
        assert result["status"] in ("completed", "stopped") and result["steps"] >= 1
        assert (root / "trials" / f"{t['number']:04d}" / "trial.yaml").exists()
    assert not [t for t in trials if t["state"] == "running"]
    check_one_truth(root, trials, summary.get("best"))
    return done


def check_one_truth(root: Path, rows: list[dict], best: dict | None) -> None:
    """Every trial: Optuna's value and intermediate values are what results.json measured, `status` (and
    the dashboard, which reads the same ``analysis.summarize``) shows the same value, and MLflow's trial run
    logs it with the same state (pruned trials too: the checkpoint ASHA acted on is their last
    intermediate); the best trial is the same in status and on MLflow's parent run."""
    import optuna
    from mlflow import MlflowClient

    from allocsearch.reports.status import summarize
    from allocsearch.training.scoring import result_objective

    ostudy = optuna.load_study(study_name=root.name, storage=f"sqlite:///{root / 'optuna.db'}")
    by_number = {r["number"]: r for r in rows}
    dashboard = {t["number"]: t for t in summarize(root)["trials"]}
    state = json.loads((root / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = {int(r.data.tags["trial_number"]): r for r in client.search_runs(
        [state["experiment_id"]], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")}
    parent = client.get_run(state["parent_run_id"])
    assert best is not None and parent.data.tags["best.trial"] == str(best["trial"])
    assert parent.data.metrics["best.objective"] == pytest.approx(best["value"])
    checked = 0
    for t in ostudy.get_trials(deepcopy=False):
        path = root / "trials" / f"{t.number:04d}" / "results.json"
        if t.state.name not in ("COMPLETE", "PRUNED") or not path.exists():
            continue
        result = json.loads(path.read_text())
        curve = {c["step"]: c["metrics"]["macro_balanced_accuracy"] for c in result["checkpoints"]}
        assert t.intermediate_values == curve, (t.number, t.intermediate_values, curve)
        assert t.value == pytest.approx(result_objective(result)), (t.number, t.value, result_objective(result))
        assert by_number[t.number]["objective"] == pytest.approx(t.value) == dashboard[t.number]["objective"]
        run = runs[t.number]
        logged = run.data.metrics.get("objective")  # none where the budget stopped a trial before a checkpoint
        assert (logged is None and t.value is None) or logged == pytest.approx(t.value), (t.number, logged, t.value)
        assert run.data.tags["state"] == by_number[t.number]["state"] == dashboard[t.number]["state"]
        checked += 1
    assert checked >= 2
    # every trial MLflow has a run for (failed and not-run ones too) carries the state status shows
    assert {n: r.data.tags.get("state") for n, r in runs.items()} == {n: by_number[n]["state"] for n in runs}


def test_search_on_a_local_ray_with_the_shared_data(tmp_path, space_file):
    if not SHARED_DATASETS.is_dir():
        pytest.skip("needs ../shared/datasets")
    out = cli("start", "--budget", "0.8cpu-min", "--space", str(space_file), "--workdir", str(tmp_path),
              "--study", "local", "--data-dir", str(SHARED_DATASETS), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    done = check_study(summary, 48.0)
    assert summary["best"] is not None and summary["end_reason"]
    assert "trial 0:" in out.stderr  # the plain progress lines off a terminal
    # the study used the full shared data, not the bundled demo
    settings = json.loads((tmp_path / "local" / "study.json").read_text())
    assert settings["data_dir"] == str(SHARED_DATASETS.resolve())
    status = cli("status", "--workdir", str(tmp_path), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["counts"] == summary["counts"]
    human = cli("status", "--workdir", str(tmp_path))
    assert human.returncode == 0 and "best    trial" in human.stdout and "top trials" in human.stdout
    assert len(done) == summary["counts"]["completed"] + summary["counts"]["pruned"]
    stop = cli("stop", "--workdir", str(tmp_path))
    assert stop.returncode == 0 and "not running" in stop.stdout


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head --port 0` on loopback, stopped at the end (also on failure)."""
    temp = Path("/tmp") / f"as-rc-{os.getpid()}"  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen(["ray", "start", "--head", "--port", "0", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", str(temp), "--block"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    address, deadline, seen = None, time.monotonic() + 90, []
    try:
        while time.monotonic() < deadline and address is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            m = re.search(r"--address='[^:']+:(\d+)'", line)
            if m:
                address = f"127.0.0.1:{m.group(1)}"
        assert address, "ray start gave no address:\n" + "".join(seen[-20:])
        yield address, temp
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_search_through_a_ray_cluster_then_resume_with_a_bigger_budget(tmp_path, space_file, ray_cluster):
    address, temp = ray_cluster
    first = cli("start", "--budget", "0.5cpu-min", "--space", str(space_file), "--workdir", str(tmp_path),
                "--study", "cluster", "--ray-address", address, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads(first.stdout)
    check_study(before, 30.0)
    # the trials ran in the cluster's worker processes: their logs are in the cluster's session folder
    logs = list((temp / "session_latest" / "logs").glob("worker-*"))
    assert logs, "no worker ran on the cluster"
    again = cli("start", "--budget", "1cpu-min", "--workdir", str(tmp_path), "--study", "cluster",
                "--ray-address", address, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads(again.stdout)
    check_study(after, 60.0)
    done_before = {t["number"]: t for t in before["trials"] if t["state"] in ("completed", "pruned")}
    done_after = {t["number"]: t for t in after["trials"]}
    for n, t in done_before.items():  # nothing lost, nothing changed
        assert done_after[n]["state"] == t["state"] and done_after[n]["objective"] == t["objective"]
    assert len(done_after) > len(before["trials"])
    assert after["budget"]["spent"] > before["budget"]["spent"]
    sessions = {r.get("session") for r in map(json.loads, (tmp_path / "cluster" / "ledger.jsonl").read_text().splitlines())}
    assert {0, 1} <= sessions
    # a resume that contradicts the stored study fails with one line and changes nothing
    settings = (tmp_path / "cluster" / "study.json").read_text()
    bad = cli("start", "--budget", "1cpu-min", "--workdir", str(tmp_path), "--study", "cluster", "--model", "minilm-l6")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert (tmp_path / "cluster" / "study.json").read_text() == settings
