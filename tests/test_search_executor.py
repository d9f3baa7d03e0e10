"""The Ray trial function on a real tiny-llama trial, with Tune's report replaced by a recorder: what it
reports at checkpoints and at the end, how it stops when Tune's scheduler stops it (SystemExit inside
report), when its budget cap runs out, and when the trial raises."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.tune")

from allocsearch.search.ray import executor  # noqa: E402

SPEC = {"name": "t", "model": "tiny-llama",
        "allocation": {"method": "mola", "experts": 2, "top_k": 1, "rank": 2},
        "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 16, "validation": 8, "test": 8}]},
        "train": {"steps": 6, "batch_size": 4, "max_length": 64, "eval_every": 2, "eval_examples": 8,
                  "lr": 1e-3}}


class Recorder:
    def __init__(self, exit_at: int | None = None):
        self.reports: list[dict] = []
        self.exit_at = exit_at

    def __call__(self, metrics: dict, checkpoint=None) -> None:
        self.reports.append(dict(metrics))
        if self.exit_at is not None and len(self.reports) >= self.exit_at:
            raise SystemExit(0)  # what Tune does inside report when it stops a trial


def run(monkeypatch, tmp_path, recorder, spec=SPEC, cap=None):
    monkeypatch.setattr(executor.tune, "report", recorder)
    config = {"number": 7, "spec": json.loads(json.dumps(spec)), "trial_dir": str(tmp_path / "trial"),
              "data_dir": None, "threads": 1, "devices": 2.0, "gpus": 0.0, "budget_seconds": cap}
    executor.trainable(config)
    return recorder.reports


def test_reports_every_checkpoint_then_the_whole_result(monkeypatch, tmp_path, one_thread):
    reports = run(monkeypatch, tmp_path, Recorder())
    checkpoints, last = reports[:-1], reports[-1]
    assert [r["step"] for r in checkpoints] == [2, 4]  # eval_every 2 of 6 steps; the end is the final report
    assert last["final"] and last["status"] == "completed" and last["step"] == 6
    payload = json.loads(last["result_json"])
    # each checkpoint report carries that checkpoint's validation score and the adapter's real size
    assert [r["objective"] for r in checkpoints] == [c["metrics"]["macro_balanced_accuracy"] for c in payload["checkpoints"]]
    assert all(r["trainable_params"] == payload["trainable_params"] for r in checkpoints)
    assert last["objective"] == payload["validation"]["macro_balanced_accuracy"]
    assert last["device_seconds"] == pytest.approx(2.0 * last["wall_seconds"])  # devices x wall
    on_disk = json.loads((tmp_path / "trial" / "results.json").read_text())
    assert on_disk["status"] == "completed" and (tmp_path / "trial" / "adapter").is_dir()


def test_a_scheduler_stop_ends_the_trial_cleanly(monkeypatch, tmp_path, one_thread):
    reports = run(monkeypatch, tmp_path, Recorder(exit_at=1))
    assert len(reports) == 1 and reports[0]["step"] == 2  # nothing reported after Tune stopped it
    result = json.loads((tmp_path / "trial" / "results.json").read_text())
    assert result["status"] == "stopped" and result["stop_reason"] == "scheduler" and result["steps"] == 2
    assert result["validation"] is None and result["test"] is None  # no final evaluation for a stopped trial


def test_checkpoint_reports_time_the_training_steps_without_the_evaluations(monkeypatch, tmp_path, one_thread):
    """A trial the scheduler stops teaches the cost model through its checkpoint reports' train_seconds:
    steps slowed to >= 50 ms each, evaluations to >= 0.5 s: the estimate counts the steps, not the evaluations."""
    import time

    from allocsearch.training import evaluate as ev

    from allocsearch.training import loop as train
    step_loss, evaluate = train._task_loss, ev.evaluate
    monkeypatch.setattr(train, "_task_loss", lambda *a: (time.sleep(0.05), step_loss(*a))[1])
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: (time.sleep(0.5), evaluate(*a, **k))[1])
    checkpoints = run(monkeypatch, tmp_path, Recorder())[:-1]
    assert [r["step"] for r in checkpoints] == [2, 4]
    for r in checkpoints:  # step x (>= 50 ms); with an evaluation counted, step 4 would be >= 0.2 + 4 x 0.5 / 3 s
        assert r["step"] * 0.05 <= r["train_seconds"] < r["step"] * 0.05 + 0.5, r
        assert r["train_seconds"] < r["wall_seconds"]


def test_the_budget_cap_stops_the_trial_and_its_partial_result_comes_back(monkeypatch, tmp_path, one_thread):
    reports = run(monkeypatch, tmp_path, Recorder(), cap=1e-6)
    last = reports[-1]
    assert last["final"] and last["status"] == "stopped" and last["step"] == 1
    assert json.loads(last["result_json"])["stop_reason"] == "budget"


def test_a_trial_that_raises_is_reported_failed_with_its_reason(monkeypatch, tmp_path, one_thread):
    bad = {**SPEC, "data": {"seed": 0, "tasks": [{"name": "sst2", "train": 10**7, "validation": 1, "test": 1}]}}
    reports = run(monkeypatch, tmp_path, Recorder(), spec=bad)
    assert len(reports) == 1 and reports[0]["final"] and reports[0]["status"] == "failed"
    assert reports[0]["failure"].startswith("DataError:") and "objective" not in reports[0]


def test_nan_is_a_failed_trial(monkeypatch, tmp_path, one_thread):
    nan = {**SPEC, "train": {**SPEC["train"], "lr": 1e30, "max_grad_norm": 0.0}}
    reports = run(monkeypatch, tmp_path, Recorder(), spec=nan)
    assert reports[-1]["status"] == "failed" and "loss became" in reports[-1]["failure"]


def test_slots_follow_the_cluster_and_fractional_gpus():
    assert executor._slots({"CPU": 16.0, "GPU": 1.0}, 2, 0.25) == 4
    assert executor._slots({"CPU": 2.0}, 1, 0) == 2
    assert executor._slots({"CPU": 8.0, "GPU": 2.0}, 1, 1) == 2
    assert executor._slots({"CPU": 1.0}, 2, 0) == 0


def test_a_dead_controllers_local_ray_leftovers_are_cleaned(tmp_path):
    import subprocess
    import sys

    fake_tmp = tmp_path / "as-ray-dead"
    fake_tmp.mkdir()
    # a process that outlived its controller: its command line names the session's temp dir
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(fake_tmp)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = tmp_path / "ray_local.json"
    record.write_text(json.dumps({"tmp": str(fake_tmp), "pid": dead.pid}))
    try:
        executor._clean_dead_session(record)
        assert leftover.wait(timeout=10) != 0  # killed
        assert not fake_tmp.exists() and not record.exists()
    finally:
        leftover.kill()


def test_a_fractional_gpu_trial_is_capped_to_its_share_of_the_gpu_memory(monkeypatch):
    import torch

    from allocsearch.search.ray import worker
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    for gpus in (0.0, 0.25, 1.0):
        worker._cap_gpu_memory(gpus)
    assert calls == [(0.25, 0)]  # a whole GPU or a CPU trial is not capped


def test_a_segfaulting_worker_leaves_its_stack_where_the_controller_reads_it(tmp_path):
    """The crash log (Python's fault handler) in the trial folder, and the reason the callback records."""
    import subprocess
    import sys

    code = ("import ctypes; from allocsearch.search.ray import worker; "
            f"worker._crash_log({str(tmp_path)!r}); ctypes.string_at(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    from allocsearch.search.ray.worker import worker_log_tail

    tail = worker_log_tail(tmp_path)
    assert tail.startswith("Fatal Python error: Segmentation fault") and "<string>" in tail

    class Trial:
        config = {"number": 3, "trial_dir": str(tmp_path)}
        error_file = str(tmp_path / "error.txt")

    (tmp_path / "error.txt").write_text("Traceback ...\nray.exceptions.ActorDiedError: The actor died unexpectedly\n")
    seen = {}

    class Ctl:
        def note_error(self, number, reason):
            seen[number] = reason

    executor.ControllerCallback(Ctl()).on_trial_error(0, [], Trial())
    assert "ActorDiedError" in seen[3] and "worker stderr: Fatal Python error: Segmentation fault" in seen[3]


def test_the_trial_report_travels_through_tunes_dicts_unchanged():
    from allocsearch.search.report import TrialReport

    checkpoint = TrialReport(number=4, step=25, objective=0.71, wall_seconds=3.0, device_seconds=6.0,
                             trainable_params=1234, train_seconds=2.5, checkpoint={"n": 16})
    sent = checkpoint.metrics()
    assert "final" not in sent and "failure" not in sent and sent["objective"] == 0.71
    back = TrialReport.parse({**sent, "training_iteration": 1, "trial_id": "x", "time_total_s": 3.1})
    assert back == checkpoint
    failed = TrialReport(number=4, step=3, final=True, status="failed", failure="loss became nan")
    assert "objective" not in failed.metrics() and TrialReport.parse(failed.metrics()) == failed
    assert TrialReport.parse(None) is None and TrialReport.parse({}) is None
