"""Cases f and g of ``scripts/reliability.py``: two controllers on one study, the MLflow tracking server
down mid-search and back (case h, the bad-input sweep: reliability_inputs.py). Each fills a
:class:`reliability_harness.Case` (see that module for the shared checks).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from reliability_harness import (DONE, STUDY, Case, Run, audit_end, first_start, lost, running,
                                 snapshot, wait_for)
from reliability_cases import _double

from allocsearch.study.folder import Study  # noqa: E402  (reliability_harness put the repo on sys.path)


def half(budget: str) -> str:
    """Half of a budget's number, same unit text (``6cpu-min`` -> ``3cpu-min``): cases f and g need a
    search that runs a while, not one as long as cases a and b."""
    m = re.match(r"^\s*([0-9.]+)\s*(.*)$", budget)
    return f"{float(m.group(1)) / 2:g}{m.group(2)}" if m else budget


def _wait_trial_running(case: Case, run: Run, session: int, timeout: float) -> bool:
    """A trial of ``session`` has started (its first ledger record) and one is RUNNING in the storage."""
    return wait_for(lambda: run.ended() or (first_start(case, session) is not None
                                            and bool(running(snapshot(case.root)))), timeout, poll=0.5) \
        and not run.ended()


def _stderr_lines(run: Run) -> list[str]:
    return [ln for ln in run.err_path.read_text(errors="replace").splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------ f) two controllers
def two_controllers_case(case: Case, args, rng) -> None:
    """A search runs; a second ``allocsearch start`` on the same study (the same command, then a resume with
    only a bigger ``--budget``) must exit non-zero with one stderr line naming the problem and the fix, no
    traceback, and change nothing: study.json and space.yaml hashes kept, the ledger only grown by the
    first controller's own records, controller.lock still the first's. The first then ends normally."""
    budget = half(args.budget)
    space = case.space(args.steps)
    first = Run(case, ["--budget", budget, "--space", str(space)])
    if not _wait_trial_running(case, first, 0, 300):
        case.fail(f"the first search ended (exit {first.proc.returncode}) before a trial ran; raise --budget")
        first.close()
        return
    time.sleep(rng.uniform(0.5, 3.0))
    study = Study.open(case.dir, STUDY)
    attempts = [("the same command", ["--budget", budget, "--space", str(space)]),
                ("a resume with a bigger --budget", ["--budget", _double(budget)])]
    before_all = snapshot(case.root)
    refused = 0
    for what, extra in attempts:
        before = _fingerprint(case.root)
        second = Run(case, extra)
        rc = second.wait(args.stop_timeout)
        n_left = second.close()
        after = _fingerprint(case.root)
        err = _stderr_lines(second)
        out = second.out_path.read_text(errors="replace").strip()
        case.say(f"second start ({what}): exit {rc}; stderr {err[:3]!r}")
        case.details.setdefault("second_starts", []).append({"what": what, "exit": rc, "stderr": err, "stdout": out})
        if rc is None:
            case.fail(f"second start ({what}) still running after {args.stop_timeout:g} s; killed")
            continue
        if rc == 0:
            case.fail(f"second start ({what}) exited 0 on a study another controller searches")
        else:
            refused += 1
        text = "\n".join(err)
        if "Traceback" in text or "Traceback" in out:
            case.fail(f"second start ({what}): a traceback")
        if len(err) != 1:
            case.fail(f"second start ({what}): {len(err)} lines on stderr, not one: {err[:4]!r}")
        elif not ("fix" in err[0] and (STUDY in err[0] or "already" in err[0])):
            case.fail(f"second start ({what}): the line does not name the problem and the fix: {err[0]!r}")
        elif "allocsearch stop" in err[0] and "--workdir" not in err[0]:
            case.notes.append(f"second start ({what}): the fix's 'allocsearch stop' has no --workdir, so it "
                              f"looks in ./allocsearch-runs, not {case.dir}")
        if out:
            case.notes.append(f"second start ({what}) wrote to stdout: {out[:80]!r}")
        if n_left:
            case.fail(f"second start ({what}) left {n_left} processes behind")
        for name in ("study.json", "space.yaml", "controller.lock"):
            if before[name] != after[name]:
                case.fail(f"second start ({what}) changed {name}")
        if after["STOP"]:
            case.fail(f"second start ({what}) left a STOP file")
        grown = after["ledger"][len(before["ledger"]):]
        if not after["ledger"].startswith(before["ledger"]):
            case.fail(f"second start ({what}): the ledger was rewritten, not appended to")
        else:
            others = sorted({r.get("session") for r in _records(grown)} - {0})
            if others:
                case.fail(f"second start ({what}): the ledger grew by records of sessions {others} "
                          f"(only the first controller's session 0 may write)")
        pid = study.running_pid()
        if pid != first.pid:
            case.fail(f"after the second start ({what}) the study's lock is held by {pid}, not the first "
                      f"controller {first.pid}")
        if first.ended():
            case.fail(f"the first search ended (exit {first.proc.returncode}) while the second start ran; "
                      f"raise --budget")
            break
    rc = first.wait(args.timeout)
    first.close()
    end = snapshot(case.root)
    case.lost += lost(before_all, end)
    audit_end(case, end, first, rc)
    sessions = sorted({r.get("session") for r in case.ledger().records()})
    if sessions != [0]:
        case.fail(f"the ledger has records of sessions {sessions}: only the first controller (0) ran")
    case.summary = (f"{refused} of {len(attempts)} second starts refused in one line; "
                    f"first search: {len([r for r in end['rows'] if r['state'] in DONE])} trials done")


def _fingerprint(root: Path) -> dict:
    def digest(name: str) -> str | None:
        path = root / name
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    ledger = root / "ledger.jsonl"
    return {"study.json": digest("study.json"), "space.yaml": digest("space.yaml"),
            "controller.lock": digest("controller.lock"), "STOP": (root / "STOP").exists(),
            "ledger": ledger.read_bytes() if ledger.is_file() else b""}


def _records(data: bytes) -> list[dict]:
    out = []
    for line in data.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"session": "unreadable"})
    return out


# ------------------------------------------------------------------------------------------ g) MLflow down
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own session, sqlite backend store in ``folder``."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc, self.starts = folder, port, None, 0
        self.uri = f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float) -> bool:
        self.starts += 1
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.folder / f"server{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}", "--workers", "1"],
            cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return wait_for(lambda: self.proc.poll() is not None or self.healthy(), timeout, poll=0.5) \
            and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        self.proc = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_outage_case(case: Case, args, rng) -> None:
    """A search logs to an ``mlflow server``; the server is SIGKILLed while a trial runs, stays down at least
    ``--outage`` s and until a trial has ended meanwhile (at most ``--max-outage`` s), then comes back on the
    same port and backend store. The search loses nothing (Optuna's records complete), and once it ends
    every completed/pruned trial is a finished nested run of the study's parent run, with its objective."""
    server = MlflowServer(case.dir / "mlflow-server", free_port())
    try:
        _mlflow_outage(case, args, rng, server)
    finally:
        server.kill()


def _mlflow_outage(case: Case, args, rng, server: MlflowServer) -> None:
    if not server.start(args.server_timeout):
        case.fail(f"mlflow server did not come up on {server.uri} in {args.server_timeout:g} s "
                  f"(see {server.folder}/server1.log)")
        return
    space = case.space(args.steps)
    run = Run(case, ["--budget", half(args.budget), "--space", str(space), "--tracking-uri", server.uri])
    if not _wait_trial_running(case, run, 0, 300):
        case.fail(f"the search ended (exit {run.proc.returncode}) before a trial ran; raise --budget")
        run.close()
        return
    time.sleep(rng.uniform(0.5, 3.0))
    before = snapshot(case.root)
    ended_before = {r["number"] for r in before["rows"] if r["state"] not in ("running", "queued")}
    server.kill()
    down_at = time.monotonic()

    def ended_while_down() -> list[int]:
        return [r["number"] for r in snapshot(case.root)["rows"]
                if r["state"] not in ("running", "queued") and r["number"] not in ended_before]

    wait_for(lambda: run.ended() or (time.monotonic() - down_at >= args.outage and ended_while_down()),
             args.max_outage, poll=0.5)
    during = ended_while_down()
    if run.ended():
        case.fail(f"the search ended (exit {run.proc.returncode}) while the server was down; raise --budget")
    up = server.start(args.server_timeout)
    outage = time.monotonic() - down_at
    if not up:
        case.fail(f"mlflow server did not come back on {server.uri} (see {server.folder}/server2.log)")
    elif run.ended():
        case.fail(f"the search ended (exit {run.proc.returncode}) before the server was back; raise --budget")
    case.say(f"server down {outage:.1f} s; trials ended meanwhile {during}; search still running: {not run.ended()}")
    rc = run.wait(args.timeout)
    run.close()
    end = snapshot(case.root)
    case.lost += lost(before, end)
    audit_end(case, end, run, rc)
    err = run.err_path.read_text(errors="replace")
    warned, back = err.count("keeping"), err.count("is back")
    not_logged = re.findall(r"mlflow: (\d+) operations could not be logged", err)
    if not during:
        case.notes.append("no trial ended while the server was down (its logs were never queued; raise --max-outage)")
    if not warned:
        case.notes.append("the search's stderr has no 'tracking ... failed' warning: the outage went unnoticed")
    if not_logged:
        case.fail(f"the tracker gave up on {not_logged[0]} operations at the end")
    found, missing, wrong, extra = _mlflow_runs(case, server.uri, end) if up else ({}, [], [], [])
    case.lost += [f"trial {n} ({s}) is not in MLflow" for n, s in missing]
    for text in wrong:
        case.fail(text)
    case.notes += extra
    case.details["mlflow"] = {"uri": server.uri, "outage_s": round(outage, 1), "ended_while_down": during,
                              "warnings": warned, "back": back, "runs": len(found)}
    done_rows = [r for r in end["rows"] if r["state"] in DONE]
    case.summary = (f"server down {outage:.0f} s, {len(during)} trials ended meanwhile; "
                    f"{len(done_rows) - len(missing)}/{len(done_rows)} done trials in MLflow")


def _mlflow_runs(case: Case, uri: str, end: dict):
    """The study's nested runs on the server: (runs by trial number, missing done trials, wrong ones, notes)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from allocsearch.tracking.tracker import EXPERIMENT, STATE_FILE
    from allocsearch.tracking.data import END_STATUS

    client = MlflowClient(tracking_uri=uri)
    wrong, notes = [], []
    exp = client.get_experiment_by_name(EXPERIMENT)
    state = json.loads((case.root / STATE_FILE).read_text()) if (case.root / STATE_FILE).is_file() else {}
    done_rows = [(r["number"], r["state"]) for r in end["rows"] if r["state"] in DONE]
    if exp is None:
        return {}, done_rows, [f"no MLflow experiment {EXPERIMENT!r} on the server"], notes
    parents = [r for r in client.search_runs([exp.experiment_id], f"tags.study_root = '{case.root.resolve()}'",
                                             run_view_type=ViewType.ACTIVE_ONLY, max_results=5000)
               if "mlflow.parentRunId" not in r.data.tags]
    if len(parents) != 1:
        wrong.append(f"{len(parents)} MLflow parent runs for the study (want 1)")
    if not parents:
        return {}, done_rows, wrong, notes
    parent = parents[0]
    if state.get("parent_run_id") != parent.info.run_id:
        wrong.append(f"{STATE_FILE} names parent run {state.get('parent_run_id')}, the server has {parent.info.run_id}")
    if parent.info.status != "FINISHED":
        wrong.append(f"the parent run ended {parent.info.status}, not FINISHED")
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                run_view_type=ViewType.ACTIVE_ONLY, max_results=5000)
    found: dict[int, list] = {}
    for r in nested:
        found.setdefault(int(r.data.tags.get("trial_number", -1)), []).append(r)
    rows = {r["number"]: r for r in end["rows"]}
    missing = []
    for n, runs in sorted(found.items()):
        if len(runs) > 1:
            wrong.append(f"trial {n} has {len(runs)} MLflow runs")
        if n not in rows:
            wrong.append(f"MLflow run {runs[0].info.run_id} names trial {n}, which the study does not have")
    for n, state_ in done_rows:
        if n not in found:
            missing.append((n, state_))
            continue
        r, row = found[n][0], rows[n]
        want = END_STATUS.get(state_)
        if r.info.status != want or r.data.tags.get("state") != state_:
            wrong.append(f"trial {n} ({state_}) is {r.info.status} / state {r.data.tags.get('state')!r} in MLflow "
                         f"(want {want} / {state_!r})")
        got = r.data.metrics.get("objective")
        if row["objective"] is not None and (got is None or not math.isclose(got, row["objective"], rel_tol=1e-6)):
            wrong.append(f"trial {n}: MLflow objective {got}, Optuna {row['objective']}")
    left = [n for n, runs in found.items() if any(r.info.status == "RUNNING" for r in runs)]
    if left:
        wrong.append(f"MLflow runs of trials {sorted(left)} still RUNNING after the search ended")
    other = [n for n, r in rows.items() if r["state"] not in DONE + ("queued", "not_run") and n not in found]
    if other:
        notes.append(f"trials {other} (not completed) have no MLflow run")
    return found, missing, wrong, notes
