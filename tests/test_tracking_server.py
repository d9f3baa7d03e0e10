"""MLflow tracking of a study against a real ``mlflow server`` on loopback (a free port, an sqlite store
in a temp folder, killed at the end): a whole study through it, and a server that is down when the search
starts and comes up later. The helpers and the autouse environment fixture are test_tracking's."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_search_controller import Clock, final, make, run_one
import test_tracking
from test_tracking import attach, check_study, client, run_every_end, runs_by_trial, tracked_study

mlflow_env = test_tracking.mlflow_env  # the autouse environment fixture, here too
empty_db = test_tracking.empty_db

pytest.importorskip("mlflow")

from allocsearch.tracking.tracker import Tracker  # noqa: E402


# ---------------------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int, empty_db: Path):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_db, folder / "m.db")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'm.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer: " + (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


@pytest.mark.slow
def test_a_study_on_a_real_tracking_server(tmp_path, empty_db, capsys):
    with mlflow_server(tmp_path / "server", free_port(), empty_db) as uri:
        ctl, numbers = tracked_study(tmp_path, uri, capsys)
        check_study(client(uri), ctl.study.root, numbers, tmp_path)
        assert any((tmp_path / "server" / "art").rglob("expert_load.png"))  # uploaded through the server
    assert not (ctl.study.root / "mlartifacts").exists()


@pytest.mark.slow
def test_a_server_down_at_the_start_gets_everything_once_it_comes_up(tmp_path, empty_db, capsys):
    port = free_port()
    clock = Clock()
    ctl = make(tmp_path / "w", clock=clock, max_failures=10)
    tracker = Tracker(ctl.study.root, f"http://127.0.0.1:{port}", clock=clock)  # nothing listens there
    attach(ctl, tracker)
    first, _ = run_one(ctl, clock, 20.0, final(objective=0.55))
    err = capsys.readouterr().err
    assert err.count("mlflow: tracking at") == 1 and tracker.pending() > 0
    with mlflow_server(tmp_path / "server", port, empty_db) as uri:
        clock.t += 120.0  # past the back-off: the next event retries
        numbers = run_every_end(ctl, clock)
        assert tracker.pending() == 0 and "is back" in capsys.readouterr().err
        ctl.close()
        tracker.close(ctl.end_reason)
        c = client(uri)
        runs = runs_by_trial(c, tracker.parent_id)
        assert set(runs) == {first, *numbers.values()}
        assert runs[first].info.status == "FINISHED" and runs[first].data.metrics["objective"] == 0.55
        check_study(c, ctl.study.root, {**numbers, "first": first}, tmp_path, completed=2)
