"""A search survives whatever stops its controller or a worker: no completed trial lost, nothing duplicated,
nothing paid twice, no trial left RUNNING. Real searches (``allocsearch start ... --json`` on the random
tiny-llama, trials of ~10-20 s), each test in its own study, at seeded random moments:

a) ``kill -9`` of the controller, N times (ALLOCSEARCH_RELIABILITY_KILLS, default 10), each followed (after
   the downtime) by a resume; after the last kill the search runs to its end. At each resume: the ledger's
   spend is the spend at the kill (downtime is not spent), the trials RUNNING at the kill are marked crashed
   / not run / recovered, no raylet / gcs_server of the killed run survived the downtime. If no trial had
   completed at the earlier kills, the last one waits for one (so "nothing lost" always checks something).
b) SIGINT, then resume, N times (ALLOCSEARCH_RELIABILITY_SIGINTS, default 5): exit 0, end reason "stopped by
   the user (SIGINT)", no trial RUNNING right after it, each running trial pruned by the user at its last
   checkpoint or failed before its first one with its configuration queued again, and that retry runs.
   The SIGINTs go early / late and to the pid / the process group: (early, pid), (late, group), (early,
   group), (late, pid), then again, so 2 already cover both targets and 4 every pair.
c) SIGKILL of a running trial's Ray worker, N times in one run (ALLOCSEARCH_RELIABILITY_WORKER_KILLS,
   default 3): the trial is recorded failed with a specific reason (not the generic one, not out of memory);
   the search goes on.
d) the controller killed between a trial's final ledger record and Optuna's tell (``faults.kill_before_tell``
   of trial ALLOCSEARCH_RELIABILITY_TELL_TRIAL, default 1), then resumed: the trial is told from its
   results.json (completed/pruned with its objective, marked recovered), not crashed, not run again.
e) start with --max-failures 9 --cpus-per-trial 1 --max-concurrent 1 --no-mlflow --scheduler none, a refused
   resume (which must change no file), then a resume with only --budget: study.json keeps the settings and
   the run obeys them.

Every test's last run must exit 0 with one JSON document on stdout and spend <= 1.01 x its budget. Sizes and
budgets: ``harness`` (ALLOCSEARCH_RELIABILITY_*).
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import signal
import time

import pytest

from allocsearch.search.budget import Budget
from allocsearch.study.folder import Files, Study
from allocsearch.study.records import State
from allocsearch.training.scoring import result_objective

from .harness import (DONE, GENERIC, RAN, RECOVERED, STUDY, Case, Run, allocsearch_json, audit_end, by_number,
                      changed, done, dropped, file_hashes, first_start, kill, ledger_has, lost, process_titles,
                      running, scale, snapshot, spans, wait_for, worker_pid)

pytestmark = pytest.mark.system


def rng_for(knobs, key: str) -> random.Random:
    return random.Random(f"{knobs.seed}-{key}")


# ------------------------------------------------------------------------------------------ a) kill -9
def test_kill9_of_the_controller_and_resume(new_case, knobs):
    case = new_case("a", f"a) kill -9 of the controller x{knobs.kills}")
    rng = rng_for(knobs, "a")
    unit = Budget.parse(knobs.budget).unit
    space = case.space(knobs.steps)
    kills: list[dict] = []
    run = None
    for k in range(knobs.kills + 1):
        session = case.ledger().next_session()  # the session number this run's controller will take
        killed, run = run, Run(case, ["--budget", knobs.budget, "--space", str(space)])
        if kills:  # a resume: the new controller recovers the study, then writes its session record
            _after_resume(case, kills[-1], run, session, unit)
            _leftovers_ended(kills[-1], killed)
        if k == knobs.kills:
            break
        delay = rng.uniform(knobs.min_delay, knobs.max_delay)
        # the last kill comes after a trial has completed if none had at the earlier ones: else "nothing lost"
        # would check nothing (a small N's kills, 8-30 s after a start, can all come before any trial ends)
        need_done = k == knobs.kills - 1 and not any(done(r["snapshot"]) for r in kills)
        wait_for(lambda: run.ended() or (time.monotonic() - run.started >= delay and ledger_has(case, session, "trial")
                                         and (not need_done or bool(done(snapshot(case.root))))), 600, poll=0.5)
        if run.ended():
            case.fail(f"run {run.index} ended (exit {run.proc.returncode}) before kill {k + 1}; raise the budget")
            break
        at = time.monotonic() - run.started
        run.proc.send_signal(signal.SIGKILL)  # the controller only, not its process group
        killed_at = time.time()
        run.proc.wait()
        time.sleep(1.0)
        snap = snapshot(case.root)
        records = case.ledger().records()
        rec = {"kill": k + 1, "at_s": round(at, 1), "session": session, "snapshot": snap,
               "spend_at_kill": case.ledger().spent(unit), "running_at_kill": running(snap),
               "ledger_lag_s": round(killed_at - max(r["time"] for r in records), 2) if records else None}
        if kills:
            case.lost += lost(kills[-1]["snapshot"], snap)
        time.sleep(knobs.downtime)
        left = run.ray_processes()
        rec["ray_after_downtime"] = {kind: len(p) for kind, p in left.items()}
        if left["raylet"] or left["gcs_server"]:
            case.fail(f"kill {k + 1}: raylet/gcs_server survived the killed controller: {rec['ray_after_downtime']}")
        kills.append(rec)  # the run is closed after the resume, which must end what is left of its Ray
        case.say(f"kill {k + 1} at {at:.1f} s: running {rec['running_at_kill']}, {len(done(snap))} done, "
                 f"spend {rec['spend_at_kill']:.1f} s, ledger {rec['ledger_lag_s']} s behind")
    code = run.wait(knobs.timeout)
    run.close()
    end = snapshot(case.root)
    if kills:
        case.lost += lost(kills[-1]["snapshot"], end)
    audit_end(case, end, run, code)
    if kills and not any(done(r["snapshot"]) for r in kills):
        case.notes.append("no trial had completed at any kill: 'nothing lost' was vacuous (raise the max delay)")
    outlived = [r["kill"] for r in kills if any(r["ray_after_downtime"].values())]
    survived = sorted({t for r in kills for t in r.get("ray_after_resume", [])})
    if outlived:  # they end themselves about a minute after their raylet: a note, not a failed check
        case.notes.append(f"Ray processes (not raylet/gcs) outlived the killed controller at kills {outlived}"
                          + (f"; still alive 10 s into the resume: {survived}" if survived else ""))
    crashed = sum(len(r["running_at_kill"]) for r in kills)
    case.summary = f"{len(kills)} kills; {crashed} trials running at them recovered"
    case.verify()


def _leftovers_ended(last: dict, killed: Run) -> None:
    """What Ray processes the killed run left must be gone once its study is resumed (the start ends them)."""
    if any(last["ray_after_downtime"].values()):
        wait_for(lambda: not any(killed.ray_processes().values()), 10, poll=0.5)
        last["ray_after_resume"] = process_titles([p for ps in killed.ray_processes().values() for p in ps])
    killed.close()


def _after_resume(case: Case, last: dict, run: Run, session: int, unit: str) -> None:
    wait_for(lambda: ledger_has(case, session, "session") or run.ended(), 180)
    last["spend_after_restart"] = case.ledger().spent(unit)
    rows = by_number(snapshot(case.root))
    k = last["kill"]
    left = [n for n in last["running_at_kill"] if rows[n]["state"] == State.RUNNING]
    case.left_running += [f"trial {n} after kill {k}" for n in left]
    wrong = [n for n in last["running_at_kill"] if n not in left
             and not str(rows[n]["reason"] or "").startswith(RECOVERED) and not rows[n]["recovered"]]
    if wrong:
        case.fail(f"kill {k}: trials {wrong} running at the kill are not marked crashed / not run / recovered")
    delta = last["spend_after_restart"] - last["spend_at_kill"]
    if abs(delta) > 1.0:
        case.fail(f"kill {k}: the ledger's spend moved by {delta:.1f} s across the downtime")


# ------------------------------------------------------------------------------------------ b) SIGINT
def user_stop_reason(sig: str) -> str:
    return f"stopped by the user ({sig}) before its first checkpoint"


def sigint_moment(i: int) -> tuple[bool, bool]:
    """(early, to the process group) of the i-th SIGINT: (early, pid), (late, group), (early, group),
    (late, pid), ... so that any 2 cover both targets and any 4 every pair."""
    return i % 2 == 0, i % 4 in (1, 2)


def test_sigint_and_resume(new_case, knobs):
    """SIGINT, then resume, N times; the last run goes to its end. Early = just after a trial started (before
    its first checkpoint); late = 8-30 s in, once a running trial has passed a checkpoint; to the process
    group as a terminal's Ctrl-C does, or to the controller's pid. Right after each: exit 0, end reason,
    nothing RUNNING, each trial of that session completed, pruned by the user at its last checkpoint, or
    failed before its first checkpoint with its configuration queued again."""
    case = new_case("b", f"b) SIGINT + resume x{knobs.sigints}")
    rng = rng_for(knobs, "b")
    space = case.space(knobs.steps)
    prev, stopped_sessions, branches = None, set(), collections.Counter()
    for i in range(knobs.sigints + 1):
        session = case.ledger().next_session()
        run = Run(case, ["--budget", knobs.budget, "--space", str(space)])
        if i == knobs.sigints:
            break
        early, group = sigint_moment(i)
        wait_for(lambda: run.ended() or first_start(case, session) is not None, 300)
        if run.ended():
            case.fail(f"run {run.index} ended (exit {run.proc.returncode}) before SIGINT {i + 1}; raise the budget")
            break
        delay = rng.uniform(0.3, 1.5) if early else rng.uniform(knobs.min_delay, knobs.max_delay)
        anchor = first_start(case, session) - time.time() + time.monotonic() if early else run.started
        wait_for(lambda: run.ended() or (time.monotonic() - anchor >= delay
                                         and (early or _past_checkpoint(case, session))), 300, poll=0.5)
        before = snapshot(case.root)
        if prev is not None:
            case.lost += lost(prev, before)
        (os.killpg if group else os.kill)(run.pid, signal.SIGINT)
        sent = time.monotonic()
        rc = run.wait(knobs.stop_timeout)
        took = time.monotonic() - sent
        if rc is None:
            case.fail(f"SIGINT {i + 1}: the controller had not exited {knobs.stop_timeout:g} s later; killed")
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
        n_left = run.close()
        if n_left:
            case.notes.append(f"SIGINT {i + 1}: {n_left} Ray processes outlived the controller")
        prev = after
        time.sleep(1.0)
    rc = run.wait(knobs.timeout)
    run.close()
    end = snapshot(case.root)
    if prev is not None:
        case.lost += lost(prev, end)
    audit_end(case, end, run, rc)
    _check_retries_ran(case, end)
    for text in dropped(end, stopped_sessions):
        case.fail(f"dropped by a SIGINT: {text}")
    for key in ("pruned by user", "failed before its first checkpoint"):
        if not branches[key]:
            case.notes.append(f"no trial was {key} at a SIGINT (branch not exercised)")
    case.summary = (f"{len(stopped_sessions)} SIGINTs: {branches['pruned by user']} trials pruned by the user, "
                    f"{branches['failed before its first checkpoint']} stopped before a checkpoint and re-run")
    case.verify()


def _past_checkpoint(case: Case, session: int) -> bool:
    """A trial of ``session`` is running past its first checkpoint (a late SIGINT prunes it there)."""
    return any(r["state"] == State.RUNNING and r["session"] == session and r["intermediate"]
               for r in snapshot(case.root)["rows"])


def _check_sigint_rows(case: Case, k: int, rows: list[dict], snap: dict) -> collections.Counter:
    seen = collections.Counter()
    queued = [r for r in snap["rows"] if r["state"] == State.QUEUED]
    for r in rows:
        n = r["number"]
        if r["state"] == State.COMPLETED or (r["state"] == State.PRUNED and r["stop_reason"] != "user"):
            seen[r["state"]] += 1  # ended before the SIGINT
        elif r["state"] == State.PRUNED:
            last = r["intermediate"][max(r["intermediate"])] if r["intermediate"] else None
            if r["objective"] is None or r["objective"] != last:
                case.fail(f"SIGINT {k}: trial {n} pruned by the user with value {r['objective']}, not its last "
                          f"checkpoint's {last}")
            seen["pruned by user"] += 1
        elif r["state"] == State.FAILED and r["reason"] == user_stop_reason("SIGINT"):
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
            if not any(q["state"] in RAN + (State.QUEUED,) for q in retries):
                told = ", ".join(f"trial {q['number']} {q['state']} ({q['reason']!r})" for q in retries) or "none"
                case.fail(f"trial {r['number']} was stopped before its first checkpoint but its retry never ran "
                          f"(retries: {told})")


# ------------------------------------------------------------------------------------------ c) worker kills
def test_sigkill_of_a_trials_worker(new_case, knobs):
    """SIGKILL of a running trial's Ray worker, past its first checkpoint, N times in one run: each trial is
    recorded (failed, not out-of-memory) with a specific reason; the search goes on."""
    case = new_case("c", f"c) SIGKILL of a trial's worker x{knobs.worker_kills}")
    rng = rng_for(knobs, "c")
    space = case.space(knobs.steps)
    run = Run(case, ["--budget", knobs.small_budget, "--space", str(space)])
    killed: list[int] = []
    for k in range(knobs.worker_kills):
        target: dict = {}

        def found() -> bool:
            if run.ended():
                return True
            for r in snapshot(case.root)["rows"]:
                if r["state"] == State.RUNNING and r["intermediate"] and r["number"] not in killed:
                    pid = worker_pid(case.root, r["number"])
                    if pid:
                        target.update(number=r["number"], pid=pid)
                        return True
            return False

        wait_for(found, 300, poll=0.5)
        if run.ended() or not target:
            case.fail(f"the run ended (exit {run.proc.returncode}) before worker kill {k + 1}; raise the small budget")
            break
        time.sleep(rng.uniform(0.0, 1.0))
        before = snapshot(case.root)
        n = target["number"]
        kill(target["pid"])
        killed.append(n)
        wait_for(lambda: by_number(snapshot(case.root))[n]["state"] != State.RUNNING or run.ended(), 120, poll=0.5)
        after = snapshot(case.root)
        case.lost += lost(before, after)
        r = by_number(after)[n]
        reason = str(r["reason"] or "")
        case.say(f"worker kill {k + 1}: trial {n} (pid {target['pid']}) -> {r['state']}: {reason[:110]!r}")
        if r["state"] not in (State.FAILED, State.CRASHED):
            case.fail(f"worker kill {k + 1}: trial {n} recorded {r['state']!r}, not failed/crashed (its worker was "
                      f"SIGKILLed; it did not run out of memory)" + (" -> marked infeasible, re-enqueued with half "
                      "the batch" if r["state"] == State.OOM else ""))
        if not reason.strip() or reason.strip() in GENERIC:
            case.fail(f"worker kill {k + 1}: trial {n}'s reason is generic or empty: {reason!r}")
    rc = run.wait(knobs.timeout)
    run.close()
    end = snapshot(case.root)
    doc = audit_end(case, end, run, rc)
    if "in a row failed" in str(doc.get("end_reason")):
        case.fail(f"the search did not go on: {doc.get('end_reason')!r}")
    after_kills = [r for r in end["rows"] if killed and r["number"] > max(killed) and r["state"] in DONE]
    if killed and not after_kills:
        case.fail(f"no trial after the last killed one (trial {max(killed)}) completed: the search did not go on")
    case.summary = f"{len(killed)} workers killed; {len(after_kills)} trials done after"
    case.verify()


# ------------------------------------------------------------------------------------------ d) kill before tell
def test_kill_between_the_ledgers_final_record_and_the_tell(new_case, knobs):
    """The controller SIGKILLs itself after trial N's results.json and final ledger record, before Optuna's
    tell (``faults.kill_before_tell``); the resume must tell it from results.json: completed/pruned with its
    objective, marked recovered, not crashed, not run again."""
    n = knobs.tell_trial
    case = new_case("d", f"d) kill before tell (trial {n}) + resume")
    space = case.space(knobs.steps)
    run = Run(case, ["--budget", knobs.small_budget, "--space", str(space)], fault=f"kill_before_tell({n})")
    rc = run.wait(knobs.timeout)
    at_kill = snapshot(case.root)
    result = Study.open(case.dir, STUDY).read_result(n)
    finals = {r["session"] for r in case.ledger().records() if r["kind"] == "trial" and r["number"] == n
              and r.get("final")}
    state = by_number(at_kill).get(n, {}).get("state")
    case.say(f"run 1 exit {rc}; trial {n} {state}, results.json "
             f"{'status ' + str(result.get('status')) if result else 'missing'}, final ledger records in sessions "
             f"{sorted(finals)}")
    if rc != -signal.SIGKILL:
        case.fail(f"the fault did not fire: run 1 exited {rc} (trial {n} never ended?)")
    if state != State.RUNNING or not result or finals != {0}:
        case.fail(f"at the kill: trial {n} is {state}, results.json {'present' if result else 'missing'}, final "
                  f"ledger records in sessions {sorted(finals)} (want running / present / [0])")
    n_left = run.close()
    if n_left:
        case.notes.append(f"{n_left} Ray processes outlived the killed controller")
    time.sleep(knobs.downtime)
    session = case.ledger().next_session()
    run = Run(case, ["--budget", knobs.small_budget])
    wait_for(lambda: ledger_has(case, session, "session") or run.ended(), 180)
    resumed = snapshot(case.root)
    case.lost += lost(at_kill, resumed)
    r = by_number(resumed).get(n, {})
    want = result_objective(result) if result else None
    case.say(f"resumed: trial {n} {r.get('state')} {r.get('objective')} (results.json: {want}), recovered "
             f"{r.get('recovered')}")
    if r.get("state") not in DONE or r.get("objective") != want:
        case.lost.append(f"trial {n} ended (results.json objective {want}) but the resume says {r.get('state')} "
                         f"{r.get('objective')} ({r.get('reason')!r})")
    if r.get("recovered") is not True:
        case.fail(f"trial {n} is not marked recovered (user_attrs 'recovered')")
    if "recorded from their results" not in run.err_path.read_text(errors="replace"):
        case.notes.append("the resume's progress did not say a trial was recorded from its results")
    rc = run.wait(knobs.timeout)
    run.close()
    end = snapshot(case.root)
    case.lost += lost(resumed, end)
    audit_end(case, end, run, rc)
    case.duplicated += [f"trial {q['number']} retries recovered trial {n}" for q in end["rows"] if q["retry_of"] == n]
    case.summary = f"trial {n} {r.get('state')} {r.get('objective')} told from results.json"
    case.verify()


# ------------------------------------------------------------------------------------------ e) stored settings
SETTINGS_FLAGS = ["--max-failures", "9", "--cpus-per-trial", "1", "--max-concurrent", "1", "--no-mlflow",
                  "--scheduler", "none"]
SETTINGS_WANT = {"max_failures": 9, "cpus_per_trial": 1.0, "max_concurrent": 1, "mlflow": False, "scheduler": "none"}


def test_resume_with_only_budget_keeps_the_settings(new_case, knobs):
    """Start with non-default execution settings; a refused resume changes no file; a resume with only
    ``--budget`` keeps every setting in study.json and runs with them (one trial at a time, no MLflow, no
    scheduler stops)."""
    case = new_case("e", "e) resume with only --budget")
    space = case.space(knobs.steps)
    run = Run(case, ["--budget", knobs.settings_budget, "--space", str(space), *SETTINGS_FLAGS])
    rc = run.wait(knobs.timeout)
    run.close()
    first = snapshot(case.root)
    _check_settings(case, "after the first start", rc)
    files = file_hashes(case.root)
    refused = Run(case, ["--budget", knobs.settings_budget, "--max-failures", "0"])
    rc_refused = refused.wait(120)
    refused.close()
    wrote = changed(files, file_hashes(case.root))
    if rc_refused == 0 or wrote:
        case.fail(f"a refused resume (--max-failures 0): exit {rc_refused}, files changed {wrote}")
    bigger = scale(knobs.settings_budget, 2)
    session = case.ledger().next_session()
    run = Run(case, ["--budget", bigger])
    rc = run.wait(knobs.timeout)
    run.close()
    stored = _check_settings(case, "after the resume with only --budget", rc)
    if stored["budget"]["seconds"] != Budget.parse(bigger).seconds:
        case.fail(f"the resume's budget {bigger} is not stored: {stored['budget']}")
    end = snapshot(case.root)
    case.lost += lost(first, end)
    audit_end(case, end, run, rc)
    ran = spans(case.ledger(), session)
    overlaps = [(a, b) for (a, sa, ea), (b, sb, eb) in itertools.pairwise(ran) if sb < ea - 0.05]
    if overlaps:
        case.fail(f"--max-concurrent 1 not kept: trials ran at once in the resumed session: {overlaps}")
    if not ran:
        case.fail("the resumed session ran no trial (its settings were not exercised)")
    mlflow = [p.name for p in case.root.iterdir() if p.name.startswith(("mlflow", "mlruns", "mlartifacts"))]
    if mlflow:
        case.fail(f"--no-mlflow not kept: {mlflow} in the study folder")
    by_scheduler = [r["number"] for r in end["rows"] if r["stop_reason"] == "scheduler"]
    if by_scheduler:
        case.fail(f"--scheduler none not kept: trials {by_scheduler} pruned by the scheduler")
    status, p = allocsearch_json(case, "status")
    scheduler = (status or {}).get("scheduler", f"unreadable (exit {p.returncode})")
    if scheduler != "none":
        case.fail(f"'status --json' says scheduler {scheduler!r}")
    case.summary = f"{len(ran)} trials one at a time after the resume; a refused start wrote nothing"
    case.verify()


def _check_settings(case: Case, when: str, rc: int | None) -> dict:
    stored = json.loads((case.root / Files.SETTINGS).read_text())
    wrong = {k: stored.get(k) for k, v in SETTINGS_WANT.items() if stored.get(k) != v}
    if rc != 0 or wrong:
        case.fail(f"{when}: exit {rc}; study.json has {wrong} (want {SETTINGS_WANT})")
    return stored
