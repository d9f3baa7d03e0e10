"""``allocsearch dashboard`` end to end in a real browser: the command serves the app on 127.0.0.1, Debian's
chromium (driven by Playwright) opens the study, opens a trial from the trials table, sees its allocation
chart and downloads the export file. Skipped only where no chromium or no Playwright is installed
(``apt-get install -y chromium`` and ``pip install playwright``)."""
from __future__ import annotations

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
from dashboard_fixtures import shared_workdir

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("ALLOCSEARCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytest.importorskip("streamlit")
pytest.importorskip("plotly")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install playwright")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"allocsearch dashboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the dashboard did not answer at {url} in time")


def test_dashboard_in_a_browser(tmp_path_factory, tmp_path):
    t0 = time.monotonic()
    wd = shared_workdir(tmp_path_factory)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "allocsearch", "dashboard", "--workdir", str(wd), "--port",
                             str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: streamlit and all die together
    try:
        _wait_until_up(url, proc, time.monotonic() + 30)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1600}, accept_downloads=True)
                page.set_default_timeout(20_000)
                page.goto(f"{url}/?study=demo")
                page.get_by_role("heading", name="Studies").wait_for()
                page.get_by_text("Budget burn-down").first.wait_for()
                page.get_by_role("link", name="Trials").click()  # the sidebar navigation
                page.get_by_role("heading", name="Trials").wait_for()
                page.get_by_role("button", name="Open trial 3").click()  # best first: trial 3
                page.get_by_role("heading", name="Trial 3 · completed · 0.8200").wait_for()
                page.get_by_text("Allocation (mola)").first.wait_for()
                page.locator(".js-plotly-plot").first.wait_for()
                export = page.get_by_role("button", name="Export trial config")
                if export.is_enabled():
                    with page.expect_download() as download:
                        export.click()
                    saved = tmp_path / download.value.suggested_filename
                    download.value.save_as(saved)
                    assert saved.name == "demo-trial-0003.yaml"
                    assert "allocsearch_export" in saved.read_text() and "trial: 3" in saved.read_text()
                else:
                    page.get_by_text("export is not available").wait_for()
                page.screenshot(path=str(tmp_path / "trial.png"))
                assert (tmp_path / "trial.png").stat().st_size > 10_000
            finally:
                browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert time.monotonic() - t0 < 60
