"""MLflow tracking of a study: the controller is driven by hand (as in test_search_controller), every event
goes to a Tracker, and what MLflow holds is checked through MlflowClient: the parent and nested runs, their
params, metric histories, tags, statuses and artifacts; resume after a crash; a client that fails. A real
``mlflow server``, and one down when the search starts: test_tracking_server.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from test_search_controller import Clock, final, make, run_one

pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from allocsearch.study.folder import CRASHED, NOT_STARTED  # noqa: E402
from allocsearch.tracking.tracker import Tracker  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch, tmp_path_factory):
    """No MLflow setting of the developer's shell leaks in; HOME-level files go to a temp folder."""
    for key in list(os.environ):
        if key.startswith("MLFLOW_"):
            monkeypatch.delenv(key)
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / "mpl"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory):
    """An MLflow sqlite database with its tables created once (creating one takes seconds here)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def sqlite_uri(empty_db, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_db, folder / "m.db")
    return f"sqlite:///{folder / 'm.db'}"


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def attach(ctl, tracker):
    ctl.emit = tracker.event
    s = ctl.study.settings
    tracker.event("study", study=ctl.study.name, root=str(ctl.study.root), budget=s["budget"],
                  spent=ctl.spent(), recovered=ctl.recovered)


def worker_result(ctl, config, objective, status="completed", failure=None):
    """What a trial's worker writes: results.json (losses, validation/test per task, expert load) and the
    adapter's allocation.yaml."""
    alloc, folder = config.spec["allocation"], Path(config.trial_dir)
    payload = {
        "name": config.spec["name"], "status": status, "failure": failure, "stop_reason": None,
        "validation": {"n": 8, "tasks": {"sst2": {"n": 8, "accuracy": 0.75, "balanced_accuracy": objective}},
                       "macro_accuracy": 0.75, "macro_balanced_accuracy": objective},
        "test": {"n": 8, "tasks": {"sst2": {"n": 8, "accuracy": 0.625, "balanced_accuracy": 0.6}},
                 "macro_accuracy": 0.625, "macro_balanced_accuracy": 0.6},
        "checkpoints": [], "losses": [[s, 1.0 / s] for s in range(1, 9)], "trainable_params": 4321,
        "total_params": 99999, "steps": 8, "tokens": 2048, "wall_seconds": 25.0, "train_seconds": 3.0,
        "device_seconds": 25.0, "tokens_per_second": 682.7, "seconds_per_step": 0.375, "peak_memory_mb": 512.5,
        "expert_load": {str(j): {"q": [1.0 / n] * n, "v": [1.0 / n] * n} for j, n in enumerate(alloc["experts"])},
        "redundancy": {str(j): 0.1 * j for j in range(len(alloc["experts"]))}, "allocation": alloc,
        "spec": config.spec, "adapter_dir": str(folder / "adapter")}
    (folder / "adapter").mkdir(parents=True, exist_ok=True)
    (folder / "adapter" / "allocation.yaml").write_text(yaml.safe_dump(alloc))
    (folder / "results.json").write_text(json.dumps(payload))


def run_every_end(ctl, clock):
    """One trial for every way a trial can end; returns {label: trial number}."""
    out = {}
    c = ctl.propose()  # completed, with two checkpoints and a full results.json
    out["completed"] = n = c.number
    ctl.on_start(n)
    for step, objective in ((2, 0.6), (4, 0.7)):
        clock.t += 5.0
        ctl.on_result(n, {"step": step, "objective": objective, "train_seconds": 1.0})
    clock.t += 10.0
    worker_result(ctl, c, 0.8)
    ctl.on_complete(n, final(objective=0.8), error=False)
    c = ctl.propose()  # stopped by the scheduler at its first rung
    out["pruned"] = c.number
    ctl.on_start(c.number)
    ctl.on_result(c.number, {"step": 2, "objective": 0.5, "train_seconds": 1.0})
    clock.t += 4.0
    ctl.on_complete(c.number, {"step": 4, "objective": 0.45, "train_seconds": 2.0}, error=False)
    out["failed"], _ = run_one(ctl, clock, 5.0, final(status="failed", objective=None,
                                                      failure="loss became nan at step 3"))
    c = ctl.propose()  # its worker died
    out["died"] = c.number
    ctl.on_start(c.number)
    ctl.on_complete(c.number, None, error=True)  # Tune's order: the searcher first, then why
    ctl.note_error(c.number, "ActorDiedError: the worker died unexpectedly (SIGKILL)")
    out["budget"], _ = run_one(ctl, clock, 5.0, {**final(status="stopped", steps=3), "result_json": json.dumps(
        {"stop_reason": "budget", "train_seconds": 1.0, "steps": 3})})
    return out


def runs_by_trial(c, parent_id):
    exp = c.get_experiment_by_name("allocsearch")
    runs = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {int(r.data.tags["trial_number"]): r for r in runs}


def history(c, run_id, key):
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def artifacts(c, run_id, dest: Path) -> dict[str, bytes]:
    dest.mkdir(parents=True, exist_ok=True)
    folder = Path(c.download_artifacts(run_id, "", str(dest)))
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def check_study(c, root: Path, numbers: dict, tmp: Path, completed: int = 1):
    """Everything run_every_end + close must have left in MLflow."""
    from PIL import Image

    state = json.loads((root / "mlflow.json").read_text())
    parent = c.get_run(state["parent_run_id"])
    assert parent.info.run_name == "s" and parent.info.status == "FINISHED"
    p = parent.data.params
    assert p["model"] == "tiny-llama" and p["budget"] == "10cpu-min" and p["sampler"] == "random"
    assert p["scheduler"] == "asha" and p["data.tasks"] == "sst2:16/8/8" and p["cpus_per_trial"] == "1.0"
    assert p["objectives"] == "accuracy" and len(p["space_fingerprint"]) == 64 and p["space"] == "test"
    assert "space.yaml" in [a.path for a in c.list_artifacts(parent.info.run_id)]
    tags = parent.data.tags
    assert tags["best.trial"] == str(numbers["completed"]) and "mola" in tags["best.summary"]
    assert parent.data.metrics["best.objective"] == pytest.approx(0.8) and parent.data.metrics["trials.completed"] == completed
    live = history(c, parent.info.run_id, "best.objective")  # one name for the best, at every trial's end and final
    assert live[-1][1] == pytest.approx(0.8) and len(live) >= 2 and "best_objective" not in parent.data.metrics
    assert parent.data.metrics["best.seeds"] == 1 and parent.data.metrics["best.trial"] == numbers["completed"]

    runs = runs_by_trial(c, parent.info.run_id)
    assert set(runs) == set(numbers.values())
    done = runs[numbers["completed"]]
    assert done.info.status == "FINISHED" and done.info.run_name == f"trial-{numbers['completed']:04d}"
    assert done.data.tags["state"] == "completed" and "pruned" not in done.data.tags
    assert done.data.tags["best"] == "true" and done.data.tags["method"] == "mola"
    for key in ("experts_g0", "experts_g3", "top_k_g0", "rank_g2", "lr", "steps", "method", "optuna.lr",
                "load_balance_coef"):
        assert key in done.data.params, key
    rid = done.info.run_id
    assert history(c, rid, "checkpoint.val_macro_balanced_accuracy") == [(2, 0.6), (4, 0.7)]
    spend = history(c, rid, "device_seconds")
    assert [s for s, _ in spend] == [2, 4, 8] and spend[-1][1] == pytest.approx(20.0)
    assert [s for s, _ in history(c, rid, "train_loss")] == list(range(1, 9))
    m = done.data.metrics
    assert m["val.macro_balanced_accuracy"] == pytest.approx(0.8) and m["test.macro_balanced_accuracy"] == 0.6
    assert m["val.sst2.balanced_accuracy"] == pytest.approx(0.8) and m["objective"] == pytest.approx(0.8)
    assert m["trainable_params"] == 4321 and m["tokens_per_second"] == pytest.approx(682.7)
    assert m["peak_memory_mb"] == 512.5
    files = artifacts(c, rid, tmp / "done")
    assert {"trial.yaml", "results.json", "allocation.yaml", "allocation.png", "expert_load.png"} <= set(files)
    for name in ("allocation.png", "expert_load.png"):
        assert files[name].startswith(PNG)
        Image.open(tmp / "done" / name).verify()

    pruned = runs[numbers["pruned"]]
    assert pruned.info.status == "FINISHED" and pruned.data.tags["pruned"] == "true"
    assert pruned.data.tags["stop_reason"] == "scheduler" and pruned.data.metrics["objective"] == 0.45
    # the result that stopped it (Tune hands it to on_complete, never as a checkpoint) ends its curve
    assert history(c, pruned.info.run_id, "checkpoint.val_macro_balanced_accuracy") == [(2, 0.5), (4, 0.45)]
    # spend at each checkpoint (2, and the deciding 4), then the trial's final spend at its last step (4)
    spend = history(c, pruned.info.run_id, "device_seconds")
    assert [s for s, _ in spend] == [2, 4, 4] and spend[-1][1] == pytest.approx(4.0)
    assert "allocation.png" in artifacts(c, pruned.info.run_id, tmp / "pruned")  # drawn from trial.yaml
    budget = runs[numbers["budget"]]
    assert budget.info.status == "FINISHED" and budget.data.tags["stop_reason"] == "budget"
    failed = runs[numbers["failed"]]
    assert failed.info.status == "FAILED" and "nan" in failed.data.tags["failure"]
    died = runs[numbers["died"]]
    assert died.info.status == "FAILED" and died.data.tags["failure"] == "ActorDiedError: the worker died unexpectedly (SIGKILL)"
    assert died.data.tags["state"] == "failed"


def tracked_study(tmp_path, uri, capsys):
    """A study run through every way a trial ends while a Tracker logs it to ``uri``, then closed: every
    operation logged, no warning. Returns (controller, numbers)."""
    clock = Clock()
    ctl = make(tmp_path / "w", clock=clock, max_failures=10)
    tracker = Tracker(ctl.study.root, uri, clock=clock)
    attach(ctl, tracker)
    numbers = run_every_end(ctl, clock)
    ctl.close()
    tracker.close(ctl.end_reason)
    assert tracker.pending() == 0 and "mlflow" not in capsys.readouterr().err
    return ctl, numbers


def test_a_study_logs_a_parent_run_and_one_nested_run_per_trial(tmp_path, empty_db, capsys):
    uri = sqlite_uri(empty_db, tmp_path / "ml")
    ctl, numbers = tracked_study(tmp_path, uri, capsys)
    c = client(uri)
    check_study(c, ctl.study.root, numbers, tmp_path)
    # artifacts beside the sqlite file, never in the current folder's ./mlruns
    exp = c.get_experiment_by_name("allocsearch")
    assert exp.artifact_location == (tmp_path / "ml" / "mlartifacts").as_uri()


def test_a_user_stop_kills_the_parent_and_prunes_the_running_trial(tmp_path, empty_db):
    clock = Clock()
    ctl = make(tmp_path / "w", clock=clock)
    uri = sqlite_uri(empty_db, tmp_path / "ml")
    tracker = Tracker(ctl.study.root, uri, clock=clock)
    attach(ctl, tracker)
    c = ctl.propose()
    ctl.on_start(c.number)
    ctl.study.request_stop()
    clock.t += 5.0
    ctl.tick()
    ctl.on_complete(c.number, {"step": 2, "objective": 0.5}, error=False)
    ctl.close()
    tracker.close(ctl.end_reason)
    cl = client(uri)
    parent = cl.get_run(tracker.parent_id)
    assert parent.info.status == "KILLED" and parent.data.tags["stop_requested"] == "true"
    assert parent.data.tags["end_reason"] == "stopped by 'allocsearch stop'"
    run = runs_by_trial(cl, tracker.parent_id)[c.number]
    assert run.info.status == "FINISHED" and run.data.tags["pruned"] == "true" and run.data.tags["stop_reason"] == "user"


def test_resume_reuses_the_parent_run_and_ends_the_runs_a_crash_left_running(tmp_path, monkeypatch):
    """Default tracking URI (sqlite in the study folder). The controller dies with one trial running, one
    admitted but never started and one told to Optuna but not yet logged; the next start ends each run with
    the trial's real outcome."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    clock = Clock()
    ctl = make(tmp_path / "w", clock=clock)
    root = ctl.study.root
    tracker = Tracker(root, clock=clock)
    attach(ctl, tracker)
    done, _ = run_one(ctl, clock, 20.0, final(objective=0.7))
    c = ctl.propose()  # told to Optuna, but the controller dies before the tracker logs its end
    unlogged = c.number
    ctl.on_start(unlogged)
    clock.t += 9.0
    worker_result(ctl, c, 0.9)
    ctl.emit = lambda kind, **data: None
    ctl.on_complete(unlogged, final(objective=0.9), error=False)
    ctl.emit = tracker.event
    c = ctl.propose()  # running when the controller dies
    crashed = c.number
    ctl.on_start(crashed)
    ctl.on_result(crashed, {"step": 2, "objective": 0.6, "train_seconds": 1.0})
    never = ctl.propose().number  # admitted, never started
    parent_id = tracker.parent_id
    assert (root / "mlflow.db").is_file() and json.loads((root / "mlflow.json").read_text())["parent_run_id"] == parent_id
    del ctl, tracker  # kill -9: no close

    uri = f"sqlite:///{root / 'mlflow.db'}"
    cl = client(uri)
    assert {r.info.status for r in runs_by_trial(cl, parent_id).values()} == {"FINISHED", "RUNNING"}
    clock.t += 3600.0
    tracker = Tracker(root, clock=clock)  # before the controller's recovery: ends what Optuna says ended
    assert tracker.parent_id == parent_id
    runs = runs_by_trial(cl, parent_id)
    assert runs[unlogged].info.status == "FINISHED" and runs[unlogged].data.metrics["objective"] == pytest.approx(0.9)
    assert runs[unlogged].data.metrics["val.macro_balanced_accuracy"] == pytest.approx(0.9)
    assert "expert_load.png" in artifacts(cl, runs[unlogged].info.run_id, tmp_path / "a")
    assert runs[crashed].info.status == "RUNNING"  # Optuna still says RUNNING until the controller recovers
    ctl = make(tmp_path / "w", clock=clock)
    attach(ctl, tracker)  # the "study" event: after recovery
    runs = runs_by_trial(cl, parent_id)
    assert runs[crashed].info.status == "FAILED" and runs[crashed].data.tags["failure"] == CRASHED
    assert runs[crashed].data.tags["state"] == "crashed"
    assert runs[never].info.status == "KILLED" and runs[never].data.tags["failure"] == NOT_STARTED
    retry, _ = run_one(ctl, clock, 10.0, final(objective=0.75))
    ctl.close()
    tracker.close(ctl.end_reason)
    exp = cl.get_experiment_by_name("allocsearch")
    parents = [r for r in cl.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [parent_id] and parents[0].info.status == "FINISHED"
    runs = runs_by_trial(cl, parent_id)
    assert set(runs) == {done, unlogged, crashed, never, retry}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert parents[0].data.tags["best.trial"] == str(unlogged) and runs[unlogged].data.tags["best"] == "true"
    assert any((root / "mlartifacts").rglob("allocation.png"))
    assert not (cwd / "mlruns").exists() and not list(cwd.iterdir())


class FlakyClient:
    """An MlflowClient whose calls fail while ``down`` (as a dead server does) or once with ``bad``."""

    def __init__(self, real):
        self.real, self.down, self.bad, self.calls = real, False, None, 0

    def __getattr__(self, name):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        method = getattr(self.real, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.down:
                raise MlflowException("API request failed: Connection refused", error_code=INTERNAL_ERROR)
            if self.bad == name:
                self.bad = None
                raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
            return method(*args, **kwargs)
        return call


def test_a_failing_client_queues_warns_once_backs_off_and_drops_only_bad_requests(tmp_path, empty_db, capsys):
    clock = Clock()
    ctl = make(tmp_path / "w", clock=clock)
    uri = sqlite_uri(empty_db, tmp_path / "ml")
    tracker = Tracker(ctl.study.root, uri, clock=clock)
    flaky = tracker._client = FlakyClient(tracker.client)
    attach(ctl, tracker)
    flaky.down = True
    numbers = [run_one(ctl, clock, 3.0, final(objective=0.6 + 0.05 * i))[0] for i in range(3)]
    err = capsys.readouterr().err
    assert err.count("mlflow: tracking at") == 1 and "the search goes on" in err
    assert tracker.pending() > 0
    calls = flaky.calls
    tracker.event("tick", spent=1.0, running=0)  # within the back-off: no call at all
    assert flaky.calls == calls
    flaky.down = False
    clock.t += 120.0
    flaky.bad = "log_artifacts"  # one bad request: dropped, the rest goes on
    tracker.event("tick", spent=1.0, running=0)
    err = capsys.readouterr().err
    assert tracker.pending() == 0, err
    assert "is back" in err and "dropped" in err
    ctl.close()
    tracker.close(ctl.end_reason)
    runs = runs_by_trial(client(uri), tracker.parent_id)
    assert set(runs) == set(numbers) and {r.info.status for r in runs.values()} == {"FINISHED"}
