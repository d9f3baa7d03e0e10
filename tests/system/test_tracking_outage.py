"""g) The MLflow tracking server goes away mid-search and comes back. ``mlflow server`` (127.0.0.1, a free
port, sqlite backend store; the ``mlflow_server`` fixture always kills it) is SIGKILLed while a trial runs,
stays down at least ALLOCSEARCH_RELIABILITY_OUTAGE s and until a trial has ended meanwhile (at most
ALLOCSEARCH_RELIABILITY_MAX_OUTAGE s), then comes back on the same port and store before the search (half of
ALLOCSEARCH_RELIABILITY_BUDGET) ends. The search loses nothing (Optuna's records complete; the usual end
checks), the tracker gives up on no operation, and once it ends every completed/pruned trial is one finished
nested MLflow run of the study's one parent run (named in mlflow.json) with its state and objective (a
missing one counts as lost), none is left RUNNING, and the parent's final ``best.objective`` / ``best.trial``
are the study's best as ``status`` reads it.
"""
from __future__ import annotations

import json
import math
import random
import re
import time

import pytest

from allocsearch.study.records import State

from .harness import DONE, Case, Run, audit_end, lost, scale, snapshot, wait_for, wait_trial_running

pytestmark = pytest.mark.system


def test_mlflow_server_down_mid_search_then_back(new_case, knobs, mlflow_server):
    case = new_case("g", "g) MLflow server down mid-search, then back")
    rng = random.Random(f"{knobs.seed}-g")
    server = mlflow_server
    assert server.start(knobs.server_timeout), \
        f"mlflow server did not come up on {server.uri} in {knobs.server_timeout:g} s (see {server.folder}/server1.log)"
    space = case.space(knobs.steps)
    run = Run(case, ["--budget", scale(knobs.budget, 0.5), "--space", str(space), "--tracking-uri", server.uri])
    assert wait_trial_running(case, run, 0, 300), \
        f"the search ended (exit {run.proc.returncode}) before a trial ran (stderr: {run.err_path})"
    time.sleep(rng.uniform(0.5, 3.0))
    before = snapshot(case.root)
    ended_before = {r["number"] for r in before["rows"] if r["state"] not in State.LIVE}
    server.kill()
    down_at = time.monotonic()

    def ended_while_down() -> list[int]:
        return [r["number"] for r in snapshot(case.root)["rows"]
                if r["state"] not in State.LIVE and r["number"] not in ended_before]

    wait_for(lambda: run.ended() or (time.monotonic() - down_at >= knobs.outage and ended_while_down()),
             knobs.max_outage, poll=0.5)
    during = ended_while_down()
    if run.ended():
        case.fail(f"the search ended (exit {run.proc.returncode}) while the server was down; raise the budget")
    up = server.start(knobs.server_timeout)
    outage = time.monotonic() - down_at
    if not up:
        case.fail(f"mlflow server did not come back on {server.uri} (see {server.folder}/server2.log)")
    elif run.ended():
        case.fail(f"the search ended (exit {run.proc.returncode}) before the server was back; raise the budget")
    case.say(f"server down {outage:.1f} s; trials ended meanwhile {during}; search still running: {not run.ended()}")
    rc = run.wait(knobs.timeout)
    run.close()
    end = snapshot(case.root)
    case.lost += lost(before, end)
    audit_end(case, end, run, rc)
    err = run.err_path.read_text(errors="replace")
    not_logged = re.findall(r"mlflow: (\d+) operations could not be logged", err)
    if not during:
        case.notes.append("no trial ended while the server was down (its logs were never queued; raise the max outage)")
    if "keeping" not in err:
        case.notes.append("the search's stderr has no 'tracking ... failed; keeping' warning: the outage went "
                          "unnoticed")
    if not_logged:
        case.fail(f"the tracker gave up on {not_logged[0]} operations at the end")
    _, missing = mlflow_runs(case, server.uri, end) if up else ({}, [])
    case.lost += [f"trial {n} ({s}) is not in MLflow" for n, s in missing]
    done_rows = [r for r in end["rows"] if r["state"] in DONE]
    case.summary = (f"server down {outage:.0f} s, {len(during)} trials ended meanwhile; "
                    f"{len(done_rows) - len(missing)}/{len(done_rows)} done trials in MLflow")
    case.verify()


def mlflow_runs(case: Case, uri: str, end: dict) -> tuple[dict, list]:
    """The study's nested runs on the server, checked (wrong ones: ``case.fail``; trials without a run:
    ``case.notes``): (runs by trial number, completed/pruned trials missing)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from allocsearch.tracking.data import END_STATUS
    from allocsearch.tracking.tracker import EXPERIMENT, STATE_FILE

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    state = json.loads((case.root / STATE_FILE).read_text()) if (case.root / STATE_FILE).is_file() else {}
    done_rows = [(r["number"], r["state"]) for r in end["rows"] if r["state"] in DONE]
    if exp is None:
        case.fail(f"no MLflow experiment {EXPERIMENT!r} on the server")
        return {}, done_rows
    parents = [r for r in client.search_runs([exp.experiment_id], f"tags.study_root = '{case.root.resolve()}'",
                                             run_view_type=ViewType.ACTIVE_ONLY, max_results=5000)
               if "mlflow.parentRunId" not in r.data.tags]
    if len(parents) != 1:
        case.fail(f"{len(parents)} MLflow parent runs for the study (want 1)")
    if not parents:
        return {}, done_rows
    parent = parents[0]
    if state.get("parent_run_id") != parent.info.run_id:
        case.fail(f"{STATE_FILE} names parent run {state.get('parent_run_id')}, the server has {parent.info.run_id}")
    if parent.info.status != "FINISHED":
        case.fail(f"the parent run ended {parent.info.status}, not FINISHED")
    best = end.get("best")
    if best:  # the parent's final best: the study's one best, as status reads it
        got, tag = parent.data.metrics.get("best.objective"), parent.data.tags.get("best.trial")
        if got is None or not math.isclose(got, best["value"], rel_tol=1e-6) or tag != str(best["trial"]):
            case.fail(f"the parent run's best is {got} (trial {tag}); status says {best['value']} "
                      f"(trial {best['trial']})")
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                run_view_type=ViewType.ACTIVE_ONLY, max_results=5000)
    found: dict[int, list] = {}
    for r in nested:
        found.setdefault(int(r.data.tags.get("trial_number", -1)), []).append(r)
    rows = {r["number"]: r for r in end["rows"]}
    missing = []
    for n, runs in sorted(found.items()):
        if len(runs) > 1:
            case.fail(f"trial {n} has {len(runs)} MLflow runs")
        if n not in rows:
            case.fail(f"MLflow run {runs[0].info.run_id} names trial {n}, which the study does not have")
    for n, state_ in done_rows:
        if n not in found:
            missing.append((n, state_))
            continue
        r, row = found[n][0], rows[n]
        want = END_STATUS.get(state_)
        if r.info.status != want or r.data.tags.get("state") != state_:
            case.fail(f"trial {n} ({state_}) is {r.info.status} / state {r.data.tags.get('state')!r} in MLflow "
                      f"(want {want} / {state_!r})")
        got = r.data.metrics.get("objective")
        if row["objective"] is not None and (got is None or not math.isclose(got, row["objective"], rel_tol=1e-6)):
            case.fail(f"trial {n}: MLflow objective {got}, Optuna {row['objective']}")
    left = [n for n, runs in found.items() if any(r.info.status == "RUNNING" for r in runs)]
    if left:
        case.fail(f"MLflow runs of trials {sorted(left)} still RUNNING after the search ended")
    other = [n for n, r in rows.items() if r["state"] not in DONE + (State.QUEUED, State.NOT_RUN) and n not in found]
    if other:
        case.notes.append(f"trials {other} (not completed) have no MLflow run")
    return found, missing
