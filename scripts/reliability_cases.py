"""Cases b-e of ``scripts/kill_resume.py``: SIGINT + resume, SIGKILL of a trial's Ray worker, a kill
between the ledger's final record and Optuna's tell, and a resume with only ``--budget`` after non-default
execution settings. Each fills a :class:`reliability_harness.Case` (see that module for the shared checks).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from reliability_harness import (DONE, DROPPED, GENERIC, KILL_BEFORE_TELL, RAN, REPO, STUDY, Case, Run,
                                 audit_end, by_number, first_start, kill, ledger_has, lost, running,
                                 snapshot, wait_for, worker_pid)

from allocsearch.search.budget import Budget  # noqa: E402  (reliability_harness put the repo on sys.path)
from allocsearch.study.ledger import Ledger  # noqa: E402
from allocsearch.study.folder import Study  # noqa: E402


def user_stop_reason(sig: str) -> str:
    return f"stopped by the user ({sig}) before its first checkpoint"


# ------------------------------------------------------------------------------------------ b) SIGINT
def sigint_case(case: Case, args, rng) -> None:
    """SIGINT, then resume, ``args.sigints`` times; the last run goes to its end. Alternately early (just
    after a trial started: before its first checkpoint) and late (8-30 s in, once a running trial has passed
    a checkpoint); the 3rd and 4th go to the whole process group, as a terminal's Ctrl-C does. Right after
    each: exit 0, end reason, nothing RUNNING, each trial of that session completed, pruned by the user at
    its last checkpoint, or failed before its first checkpoint with its configuration queued again."""
    space = case.space(args.steps)
    prev, stopped_sessions, branches = None, set(), collections.Counter()
    for i in range(args.sigints + 1):
        session = case.ledger().next_session()
        run = Run(case, ["--budget", args.budget, "--space", str(space)])
        if i == args.sigints:
            break
        early, group = i % 2 == 0, (i // 2) % 2 == 1
        wait_for(lambda: run.ended() or first_start(case, session) is not None, 300)
        if run.ended():
            case.fail(f"run {run.index} ended (exit {run.proc.returncode}) before SIGINT {i + 1}; raise --budget")
            break
        delay = rng.uniform(0.3, 1.5) if early else rng.uniform(args.min_delay, args.max_delay)
        anchor = first_start(case, session) - time.time() + time.monotonic() if early else run.started
        wait_for(lambda: run.ended() or (time.monotonic() - anchor >= delay
                                         and (early or _past_checkpoint(case, session))), 300, poll=0.5)
        before = snapshot(case.root)
        if prev is not None:
            case.lost += lost(prev, before)
        (os.killpg if group else os.kill)(run.pid, signal.SIGINT)
        sent = time.monotonic()
        rc = run.wait(args.stop_timeout)
        took = time.monotonic() - sent
        if rc is None:
            case.fail(f"SIGINT {i + 1}: the controller had not exited {args.stop_timeout:g} s later; killed")
        after = snapshot(case.root)
        doc, _ = run.summary()
        run.check_json()
        if rc != 0 or doc.get("end_reason") != "stopped by the user (SIGINT)":
            case.fail(f"SIGINT {i + 1}: exit {rc}, end reason {doc.get('end_reason')!r}")
        case.lost += lost(before, after)
        case.left_running += [f"trial {n} after SIGINT {i + 1}" for n in running(after)]
        mine = [r for r in after["rows"] if r["session"] == session and r["state"] in RAN]
        seen = _check_sigint_rows(case, i + 1, mine, after)
        branches.update(seen)
        stopped_sessions.add(session)
        case.say(f"SIGINT {i + 1} ({'early' if early else 'late'}, {'group' if group else 'pid'}) at "
                 f"{time.monotonic() - run.started - took:.1f} s: exit {rc} in {took:.1f} s, running before "
                 f"{running(before)}, {dict(seen) or 'no trial of the session'}")
        case.details.setdefault("sigints", []).append(
            {"sigint": i + 1, "early": early, "group": group, "exit": rc, "exit_s": round(took, 1),
             "running_before": running(before), "outcomes": dict(seen)})
        n_left = run.close()
        if n_left:
            case.notes.append(f"SIGINT {i + 1}: {n_left} Ray processes outlived the controller")
        prev = after
        time.sleep(1.0)
    rc = run.wait(args.timeout)
    run.close()
    end = snapshot(case.root)
    if prev is not None:
        case.lost += lost(prev, end)
    audit_end(case, end, run, rc)
    _check_retries_ran(case, end)
    for text in dropped(case, end, stopped_sessions):
        case.fail(f"dropped by a SIGINT: {text}")
    for key in ("pruned by user", "failed before its first checkpoint"):
        if not branches[key]:
            case.notes.append(f"no trial was {key} at a SIGINT (branch not exercised)")
    case.details["branches"] = dict(branches)
    case.summary = (f"{len(stopped_sessions)} SIGINTs: {branches['pruned by user']} trials pruned by the user, "
                    f"{branches['failed before its first checkpoint']} stopped before a checkpoint and re-run")


def _past_checkpoint(case: Case, session: int) -> bool:
    """A trial of ``session`` is running past its first checkpoint (a late SIGINT prunes it there)."""
    return any(r["state"] == "running" and r["session"] == session and r["intermediate"]
               for r in snapshot(case.root)["rows"])


def _check_sigint_rows(case: Case, k: int, rows: list[dict], snap: dict) -> collections.Counter:
    seen = collections.Counter()
    queued = [r for r in snap["rows"] if r["state"] == "queued"]
    for r in rows:
        n = r["number"]
        if r["state"] == "completed" or (r["state"] == "pruned" and r["stop_reason"] != "user"):
            seen[r["state"]] += 1  # ended before the SIGINT
        elif r["state"] == "pruned":
            last = r["intermediate"][max(r["intermediate"])] if r["intermediate"] else None
            if r["objective"] is None or r["objective"] != last:
                case.fail(f"SIGINT {k}: trial {n} pruned by the user with value {r['objective']}, not its last "
                          f"checkpoint's {last}")
            seen["pruned by user"] += 1
        elif r["state"] == "failed" and r["reason"] == user_stop_reason("SIGINT"):
            retry = [q for q in queued if q["retry_of"] == n]  # a user's stop is no crash: every time
            if len(retry) != 1 or retry[0]["params"] != r["params"]:
                case.fail(f"SIGINT {k}: trial {n} stopped before its first checkpoint has {len(retry)} queued "
                          f"retries (want 1 with its configuration)")
            seen["failed before its first checkpoint"] += 1
        else:
            case.fail(f"SIGINT {k}: trial {n} ended {r['state']} ({r['reason']!r})")
            seen[r["state"]] += 1
    return seen


def _check_retries_ran(case: Case, end: dict) -> None:
    """Each trial stopped before its first checkpoint: its retry ran (or waits in the queue)."""
    for r in end["rows"]:
        if str(r["reason"] or "").startswith("stopped by the user ("):
            retries = [q for q in end["rows"] if q["retry_of"] == r["number"]]
            if not any(q["state"] in RAN + ("queued",) for q in retries):
                told = ", ".join(f"trial {q['number']} {q['state']} ({q['reason']!r})" for q in retries) or "none"
                case.fail(f"trial {r['number']} was stopped before its first checkpoint but its retry never ran "
                          f"(retries: {told})")


# ------------------------------------------------------------------------------------------ c) worker kills
def worker_kill_case(case: Case, args, rng) -> None:
    """SIGKILL of a running trial's Ray worker, past its first checkpoint, ``args.worker_kills`` times in one
    run: each trial is recorded (failed, not out-of-memory) with a specific reason; the search goes on."""
    space = case.space(args.steps)
    run = Run(case, ["--budget", args.small_budget, "--space", str(space)])
    killed: list[int] = []
    for k in range(args.worker_kills):
        target: dict = {}

        def found() -> bool:
            if run.ended():
                return True
            for r in snapshot(case.root)["rows"]:
                if r["state"] == "running" and r["intermediate"] and r["number"] not in killed:
                    pid = worker_pid(case.root, r["number"])
                    if pid:
                        target.update(number=r["number"], pid=pid)
                        return True
            return False

        wait_for(found, 300, poll=0.5)
        if run.ended() or not target:
            case.fail(f"the run ended (exit {run.proc.returncode}) before worker kill {k + 1}; raise --small-budget")
            break
        time.sleep(rng.uniform(0.0, 1.0))
        before = snapshot(case.root)
        n = target["number"]
        kill(target["pid"])
        killed.append(n)
        wait_for(lambda: by_number(snapshot(case.root))[n]["state"] != "running" or run.ended(), 120, poll=0.5)
        after = snapshot(case.root)
        case.lost += lost(before, after)
        r = by_number(after)[n]
        reason = str(r["reason"] or "")
        case.say(f"worker kill {k + 1}: trial {n} (pid {target['pid']}) -> {r['state']}: {reason[:110]!r}")
        case.details.setdefault("kills", []).append({"trial": n, "pid": target["pid"], "state": r["state"],
                                                     "reason": reason})
        if r["state"] not in ("failed", "crashed"):
            case.fail(f"worker kill {k + 1}: trial {n} recorded {r['state']!r}, not failed/crashed (its worker was "
                      f"SIGKILLed; it did not run out of memory)" + (" -> marked infeasible, re-enqueued with half "
                      "the batch" if r["state"] == "oom" else ""))
        if not reason.strip() or reason.strip() in GENERIC:
            case.fail(f"worker kill {k + 1}: trial {n}'s reason is generic or empty: {reason!r}")
    rc = run.wait(args.timeout)
    run.close()
    end = snapshot(case.root)
    doc = audit_end(case, end, run, rc)
    if "in a row failed" in str(doc.get("end_reason")):
        case.fail(f"the search did not go on: {doc.get('end_reason')!r}")
    after_kills = [r for r in end["rows"] if killed and r["number"] > max(killed) and r["state"] in DONE]
    if killed and not after_kills:
        case.fail(f"no trial after the last killed one (trial {max(killed)}) completed: the search did not go on")
    case.summary = f"{len(killed)} workers killed; {len(after_kills)} trials done after"


# ------------------------------------------------------------------------------------------ d) kill before tell
def tell_kill_case(case: Case, args, rng) -> None:
    """The controller SIGKILLs itself after trial ``args.tell_trial``'s results.json and final ledger record,
    before Optuna's tell (``ALLOCSEARCH_TEST_KILL_BEFORE_TELL``); the resume must tell it from results.json:
    completed/pruned with its objective, marked recovered, not crashed, not run again."""
    n = args.tell_trial
    space = case.space(args.steps)
    run = Run(case, ["--budget", args.small_budget, "--space", str(space)], env={KILL_BEFORE_TELL: str(n)})
    rc = run.wait(args.timeout)
    at_kill = snapshot(case.root)
    result = Study.open(case.dir, STUDY).read_result(n)
    finals = {r["session"] for r in case.ledger().records() if r["kind"] == "trial" and r["number"] == n
              and r.get("final")}
    state = by_number(at_kill).get(n, {}).get("state")
    case.say(f"run 1 exit {rc}; trial {n} {state}, results.json {'status ' + str(result.get('status')) if result else 'missing'}"
             f", final ledger records in sessions {sorted(finals)}")
    if rc != -signal.SIGKILL:
        case.fail(f"the hook did not fire: run 1 exited {rc} (trial {n} never ended?)")
    if state != "running" or not result or finals != {0}:
        case.fail(f"at the kill: trial {n} is {state}, results.json {'present' if result else 'missing'}, final "
                  f"ledger records in sessions {sorted(finals)} (want running / present / [0])")
    n_left = run.close()
    if n_left:
        case.notes.append(f"{n_left} Ray processes outlived the killed controller")
    time.sleep(args.downtime)
    session = case.ledger().next_session()
    run = Run(case, ["--budget", args.small_budget])
    wait_for(lambda: ledger_has(case, session, "session") or run.ended(), 180)
    resumed = snapshot(case.root)
    case.lost += lost(at_kill, resumed)
    r = by_number(resumed).get(n, {})
    from allocsearch.training.scoring import result_objective

    want = result_objective(result) if result else None
    case.details["told"] = {"trial": n, "state": r.get("state"), "objective": r.get("objective"), "want": want,
                            "recovered": r.get("recovered"), "reason": r.get("reason")}
    case.say(f"resumed: trial {n} {r.get('state')} {r.get('objective')} (results.json: {want}), recovered "
             f"{r.get('recovered')}")
    if r.get("state") not in DONE or r.get("objective") != want:
        case.lost.append(f"trial {n} ended (results.json objective {want}) but the resume says {r.get('state')} "
                         f"{r.get('objective')} ({r.get('reason')!r})")
    if r.get("recovered") is not True:
        case.fail(f"trial {n} is not marked recovered (user_attrs 'recovered')")
    if "recorded from their results" not in run.err_path.read_text(errors="replace"):
        case.notes.append("the resume's progress did not say a trial was recorded from its results")
    rc = run.wait(args.timeout)
    run.close()
    end = snapshot(case.root)
    case.lost += lost(resumed, end)
    audit_end(case, end, run, rc)
    case.duplicated += [f"trial {q['number']} retries recovered trial {n}" for q in end["rows"] if q["retry_of"] == n]
    case.summary = f"trial {n} {r.get('state')} {r.get('objective')} told from results.json"


# ------------------------------------------------------------------------------------------ e) stored settings
SETTINGS_FLAGS = ["--max-failures", "9", "--cpus-per-trial", "1", "--max-concurrent", "1", "--no-mlflow",
                  "--scheduler", "none"]
SETTINGS_WANT = {"max_failures": 9, "cpus_per_trial": 1.0, "max_concurrent": 1, "mlflow": False, "scheduler": "none"}


def settings_case(case: Case, args, rng) -> None:
    """Start with non-default execution settings; a refused resume changes no file; a resume with only
    ``--budget`` keeps every setting in study.json and runs with them (one trial at a time, no MLflow,
    no scheduler stops)."""
    space = case.space(args.steps)
    run = Run(case, ["--budget", args.settings_budget, "--space", str(space), *SETTINGS_FLAGS])
    rc = run.wait(args.timeout)
    run.close()
    first = snapshot(case.root)
    _check_settings(case, "after the first start", rc)
    files = study_files(case.root)
    refused = Run(case, ["--budget", args.settings_budget, "--max-failures", "0"])
    rc_refused = refused.wait(120)
    refused.close()
    now = study_files(case.root)
    changed = sorted(k for k in set(files) | set(now) if files.get(k) != now.get(k))
    if rc_refused == 0 or changed:
        case.fail(f"a refused resume (--max-failures 0): exit {rc_refused}, files changed {changed}")
    bigger = _double(args.settings_budget)
    session = case.ledger().next_session()
    run = Run(case, ["--budget", bigger])
    rc = run.wait(args.timeout)
    run.close()
    stored = _check_settings(case, "after the resume with only --budget", rc)
    if stored["budget"]["seconds"] != Budget.parse(bigger).seconds:
        case.fail(f"the resume's budget {bigger} is not stored: {stored['budget']}")
    end = snapshot(case.root)
    case.lost += lost(first, end)
    audit_end(case, end, run, rc)
    spans = _spans(case.ledger(), session)
    overlaps = [(a, b) for (a, sa, ea), (b, sb, eb) in zip(spans, spans[1:]) if sb < ea - 0.05]
    if overlaps:
        case.fail(f"--max-concurrent 1 not kept: trials ran at once in the resumed session: {overlaps}")
    if len(spans) < 1:
        case.fail("the resumed session ran no trial (its settings were not exercised)")
    mlflow = [p.name for p in case.root.iterdir() if p.name.startswith(("mlflow", "mlruns", "mlartifacts"))]
    if mlflow:
        case.fail(f"--no-mlflow not kept: {mlflow} in the study folder")
    by_scheduler = [r["number"] for r in end["rows"] if r["stop_reason"] == "scheduler"]
    if by_scheduler:
        case.fail(f"--scheduler none not kept: trials {by_scheduler} pruned by the scheduler")
    status = subprocess.run([sys.executable, "-m", "allocsearch", "status", "--workdir", str(case.dir), "--study",
                             STUDY, "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    try:
        scheduler = json.loads(status.stdout)["scheduler"]
    except (ValueError, KeyError):
        scheduler = f"unreadable (exit {status.returncode})"
    if scheduler != "none":
        case.fail(f"'status --json' says scheduler {scheduler!r}")
    case.summary = f"{len(spans)} trials one at a time after the resume; a refused start wrote nothing"


def _check_settings(case: Case, when: str, rc: int | None) -> dict:
    stored = json.loads((case.root / "study.json").read_text())
    wrong = {k: stored.get(k) for k, v in SETTINGS_WANT.items() if stored.get(k) != v}
    if rc != 0 or wrong:
        case.fail(f"{when}: exit {rc}; study.json has {wrong} (want {SETTINGS_WANT})")
    return stored


def _double(text: str) -> str:
    m = re.match(r"^([0-9.]+)(.*)$", text)
    return f"{float(m.group(1)) * 2:g}{m.group(2)}" if m else text


def _spans(ledger: Ledger, session: int) -> list[tuple[int, float, float]]:
    """(number, first record, final record) of each trial of ``session``, by start time (epoch seconds)."""
    spans: dict[int, list[float]] = {}
    for r in ledger.records():
        if r["kind"] == "trial" and r["session"] == session:
            span = spans.setdefault(r["number"], [r["time"], r["time"]])
            span[1] = max(span[1], r["time"])
    return sorted(((n, s, e) for n, (s, e) in spans.items()), key=lambda x: x[1])


# ------------------------------------------------------------------------------------------ shared by b, e
def dropped(case: Case, end: dict, sessions: set[int]) -> list[str]:
    """Enqueued configurations (paper priors, retries) a user stop (in ``sessions``) dropped: told not-run
    and never enqueued again, so they never run."""
    out = []
    for r in end["rows"]:
        if r["state"] != "not_run" or r["reason"] not in DROPPED or r["session"] not in sessions:
            continue
        if r["prior"] is None and r["retry_of"] is None:
            continue  # a sampled configuration: the sampler draws another, nothing is owed
        again = [s for s in end["rows"] if s["number"] > r["number"] and s["params"] == r["params"]
                 and s["state"] != "not_run"]
        if not again:
            what = f"prior {r['prior']!r}" if r["prior"] else f"retry of trial {r['retry_of']}"
            out.append(f"trial {r['number']} ({what}) was told not_run ({r['reason']!r}) and never enqueued again")
    return out


def study_files(root: Path) -> dict[str, str]:
    """Every file of a study folder -> its sha256 (to prove a refused start wrote nothing)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


