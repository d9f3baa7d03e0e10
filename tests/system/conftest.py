"""Fixtures of the system tests: the suite's sizes (``knobs``, from ALLOCSEARCH_RELIABILITY_*: see
``harness``), the session's folder (studies and the shared model cache), a short Ray temp root under /tmp,
``new_case`` (a test's study and findings; every run it started is ended afterwards), ``mlflow_server``
(``mlflow server`` on loopback, always killed), and the suite's table at the end of the run."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from .harness import REPORT, Case, Knobs, MlflowServer, free_port, table_lines


@pytest.fixture(scope="session")
def knobs() -> Knobs:
    return Knobs.from_env()


@pytest.fixture(scope="session")
def system_base(tmp_path_factory) -> Path:
    """The session's folder: one study folder per case, and the model cache the cases share."""
    return tmp_path_factory.mktemp("system")


@pytest.fixture(scope="session")
def ray_root():
    """Ray's temp folders (one per run): short, under /tmp, as Ray's socket paths have a length limit."""
    path = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def new_case(system_base, ray_root):
    """``new_case(key, title)``: a :class:`harness.Case` in its own folder; afterwards every run it started is
    ended (with what is left of its Ray) and the case goes into the suite's table."""
    made: list[tuple[Case, float]] = []

    def make(key: str, title: str) -> Case:
        case = Case(key, title, system_base, ray_root)
        assert not case.dir.exists(), f"case {key} twice in one session"
        made.append((case, time.monotonic()))
        return case

    yield make
    for case, t0 in made:
        case.close_runs()
        case.seconds = time.monotonic() - t0
        REPORT.append(case)


@pytest.fixture
def mlflow_server(system_base):
    """An ``mlflow server`` (not started yet: ``server.start(timeout)``) on a free loopback port, its sqlite
    store and logs in the session's folder; killed, with its workers, whatever the test does."""
    server = MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-server-", dir=system_base)), free_port())
    try:
        yield server
    finally:
        server.kill()


def pytest_terminal_summary(terminalreporter):
    """The suite's table (pytest's own report is the record; this is its overview)."""
    if REPORT:
        terminalreporter.section("reliability suite")
        for line in table_lines(REPORT):
            terminalreporter.write_line(line)
