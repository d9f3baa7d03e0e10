"""``allocsearch dashboard``: the Streamlit app in ``dashboard/`` over the studies of a workdir (read-only)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import click

from allocsearch.errors import AllocsearchError
from allocsearch.cli.options import workdir_option

APP = "streamlit_app.py"


def dashboard_dir() -> Path:
    """The app: ``$ALLOCSEARCH_DASHBOARD``, else ``dashboard/`` beside the package (checkout, editable
    install), else ``<sys.prefix>/share/allocsearch/dashboard`` (wheel; or the user base's share/ after
    ``pip install --user``)."""
    if os.environ.get("ALLOCSEARCH_DASHBOARD"):
        return Path(os.environ["ALLOCSEARCH_DASHBOARD"]).expanduser()
    beside = Path(__file__).resolve().parents[2] / "dashboard"
    if (beside / APP).is_file():
        return beside
    import site

    installed = [Path(p) / "share" / "allocsearch" / "dashboard" for p in (sys.prefix, site.USER_BASE) if p]
    return next((p for p in installed if (p / APP).is_file()), installed[0])


def streamlit_command(app: Path, workdir: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port",
            str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
            "--", "--workdir", str(Path(workdir).resolve())]


@click.command("dashboard")
@workdir_option
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default serves this machine only (0.0.0.0 exposes it to the network).")
def dashboard(workdir, port, host):
    """Browse the studies of a workdir in the browser: budget burn-down, trials, one trial's allocation,
    learning curve and expert load, comparisons, parameter importance, the Pareto front and export.
    Read-only; it follows a running search (refresh, or auto-refresh in the sidebar).

    \b
    Examples:
      allocsearch dashboard                                   # http://127.0.0.1:8501, ./allocsearch-runs
      allocsearch dashboard --workdir /data/runs --port 8600
      ssh -L 8501:127.0.0.1:8501 gpu-box                      # then run it on gpu-box, open it here
    """
    missing = [m for m in ("streamlit", "plotly") if importlib.util.find_spec(m) is None]
    if missing:
        raise AllocsearchError(f"the dashboard needs {' and '.join(missing)}; fix: pip install "
                               f"'allocsearch[dashboard]' (or pip install streamlit plotly)")
    app = dashboard_dir() / APP
    if not app.is_file():
        raise AllocsearchError(f"the dashboard app is not installed ({app} is missing); fix: reinstall allocsearch "
                               f"or set ALLOCSEARCH_DASHBOARD to the dashboard/ folder of a checkout")
    if not Path(workdir).is_dir():
        click.echo(f"note: {workdir} does not exist yet; the dashboard shows its studies once a search starts",
                   err=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host}: anyone who can reach this machine can read the studies", err=True)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"dashboard: http://{shown}:{port} (studies in {Path(workdir).resolve()}); Ctrl-C stops it",
               err=True)
    proc = subprocess.Popen(streamlit_command(app, workdir, host, port))
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it shut down
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    if code not in (0, -2, 130):
        raise AllocsearchError(f"streamlit exited with status {code} (port {port} in use? try --port)")
