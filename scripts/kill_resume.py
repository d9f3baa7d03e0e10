#!/usr/bin/env python3
"""Reliability check of the search service: a search survives whatever stops its controller or a worker,
with no completed trial lost, nothing duplicated, nothing paid twice and no trial left RUNNING.

    python3 scripts/kill_resume.py --kills 10 --sigints 5 --worker-kills 3 --seed 0 --budget 6cpu-min

Each case runs real searches (``allocsearch start ... --json`` on the random tiny-llama, trials of ~10-20 s)
in its own study, as subprocesses in their own sessions, at seeded random moments:

a) ``kill -9`` of the controller, N times, each followed (after ``--downtime``) by a resume; after the last
   kill the search runs to its end. At each resume: the ledger's spend is the spend at the kill (downtime
   is not spent), the trials RUNNING at the kill are marked crashed / not run, no raylet / gcs_server of
   the killed run survived the downtime.
b) SIGINT, then resume, N times (reliability_cases.sigint_case): exit 0, end reason "stopped by the user
   (SIGINT)", no trial RUNNING right after it, each running trial pruned by the user at its last checkpoint
   or failed before its first one with its configuration queued again, and that retry runs.
c) SIGKILL of a running trial's Ray worker, N times in one run (reliability_cases.worker_kill_case): the
   trial is recorded failed with a specific reason (not the generic one, not out-of-memory); the search
   goes on.
d) the controller killed between a trial's final ledger record and Optuna's tell (the
   ALLOCSEARCH_TEST_KILL_BEFORE_TELL hook, trial ``--tell-trial``), then resumed: the trial is told from its
   results.json (completed/pruned with its objective, marked recovered), not crashed, not run again.
e) start with --max-failures 9 --cpus-per-trial 1 --max-concurrent 1 --no-mlflow --scheduler none, a refused
   resume (which must change no file), then a resume with only --budget: study.json keeps the settings and
   the run obeys them.

Every case's last run must exit 0 with one JSON document on stdout and spend <= 1.01 x its budget. One
table at the end: case | runs | completed trials lost | duplicated | paid twice | left RUNNING | notes, where
"paid twice" is a completed/pruned configuration run again as a new trial, or a trial number the ledger
charges in two sessions. Exit 1 if any count is non-zero or any check fails. The studies stay in
``--workdir`` (default: a new temp folder); Ray's temp folders are removed.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reliability_cases as cases  # noqa: E402
import reliability_harness as rel  # noqa: E402
from reliability_harness import (RECOVERED, Case, Run, by_number, lost, run_cases, running, snapshot,  # noqa: E402
                                 wait_for)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python3 scripts/kill_resume.py --kills 10 --sigints 5 --worker-kills 3 "
                                       "--seed 0 --budget 6cpu-min --out /tmp/reliability.json")
    p.add_argument("--cases", default="abcde", help="which cases to run (default abcde)")
    p.add_argument("--kills", type=int, default=10, help="a) SIGKILLs of the controller (default 10)")
    p.add_argument("--sigints", type=int, default=5, help="b) SIGINTs, each followed by a resume (default 5)")
    p.add_argument("--worker-kills", type=int, default=3, help="c) SIGKILLs of a trial's Ray worker (default 3)")
    p.add_argument("--tell-trial", type=int, default=1, help="d) the trial killed before its tell (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--budget", default="6cpu-min", help="budget of cases a and b (default 6cpu-min)")
    p.add_argument("--small-budget", default="1.5cpu-min", help="budget of cases c and d (default 1.5cpu-min)")
    p.add_argument("--settings-budget", default="0.4cpu-min", help="budget of case e, one trial at a time "
                   "(default 0.4cpu-min; its resume doubles it)")
    p.add_argument("--downtime", type=float, default=10.0, help="seconds between a kill and the resume (default 10)")
    p.add_argument("--min-delay", type=float, default=8.0, help="earliest kill, seconds after a (re)start (default 8)")
    p.add_argument("--max-delay", type=float, default=30.0, help="latest kill, seconds after a (re)start (default 30)")
    p.add_argument("--steps", type=int, default=100, help="training steps per trial (default 100: ~10-15 s)")
    p.add_argument("--stop-timeout", type=float, default=120.0, help="b) seconds a SIGINT may take (default 120)")
    p.add_argument("--timeout", type=float, default=900.0, help="limit for a run to its end, seconds (default 900)")
    p.add_argument("--workdir", default=None, help="where the studies go (default: a new temp folder)")
    p.add_argument("--out", default=None, help="JSON report (default: <workdir>/kill_resume.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ a) kill -9
def kill9_case(case: Case, args, rng) -> None:
    from allocsearch.search.budget import Budget

    unit = Budget.parse(args.budget).unit
    space = case.space(args.steps)
    kills: list[dict] = []
    run = None
    for k in range(args.kills + 1):
        session = case.ledger().next_session()  # the session number this run's controller will take
        killed, run = run, Run(case, ["--budget", args.budget, "--space", str(space)])
        if kills:  # a resume: the new controller recovers the study, then writes its session record
            _after_resume(case, kills[-1], run, session, unit)
            _leftovers_ended(case, kills[-1], killed)
        if k == args.kills:
            break
        delay = rng.uniform(args.min_delay, args.max_delay)
        wait_for(lambda: run.ended() or (time.monotonic() - run.started >= delay
                                         and rel.ledger_has(case, session, "trial")), 600)
        if run.ended():
            case.fail(f"run {run.index} ended (exit {run.proc.returncode}) before kill {k + 1}; raise --budget")
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
        time.sleep(args.downtime)
        left = run.ray_processes()
        rec["ray_after_downtime"] = {kind: len(p) for kind, p in left.items()}
        if left["raylet"] or left["gcs_server"]:
            case.fail(f"kill {k + 1}: raylet/gcs_server survived the killed controller: {rec['ray_after_downtime']}")
        kills.append(rec)  # the run is closed after the resume, which must end what is left of its Ray
        case.say(f"kill {k + 1} at {at:.1f} s: running {rec['running_at_kill']}, {len(rel.done(snap))} done, "
                 f"spend {rec['spend_at_kill']:.1f} s, ledger {rec['ledger_lag_s']} s behind")
    code = run.wait(args.timeout)
    run.close()
    end = snapshot(case.root)
    if kills:
        case.lost += lost(kills[-1]["snapshot"], end)
    rel.audit_end(case, end, run, code)
    if kills and not any(rel.done(r["snapshot"]) for r in kills):
        case.notes.append("no trial had completed at any kill: 'nothing lost' was vacuous (raise --max-delay)")
    for r in kills:
        r["snapshot"] = {"counts": r["snapshot"]["counts"], "spent": r["snapshot"]["spent"]}
    case.details["kills"] = kills
    outlived = [r["kill"] for r in kills if any(r["ray_after_downtime"].values())]
    survived = sorted({t for r in kills for t in r.get("ray_after_resume", [])})
    if outlived:  # they end themselves about a minute after their raylet: a note, not a failed check
        case.notes.append(f"Ray processes (not raylet/gcs) outlived the killed controller at kills {outlived}"
                          + (f"; still alive 10 s into the resume: {survived}" if survived else ""))
    crashed = sum(len(r["running_at_kill"]) for r in kills)
    case.summary = f"{len(kills)} kills; {crashed} trials running at them recovered"


def _leftovers_ended(case: Case, last: dict, killed: Run) -> None:
    """What Ray processes the killed run left must be gone once its study is resumed (the start ends them)."""
    if any(last["ray_after_downtime"].values()):
        wait_for(lambda: not any(killed.ray_processes().values()), 10, poll=0.5)
        last["ray_after_resume"] = _titles(killed)
    killed.close()


def _titles(run: Run) -> list[str]:
    out = []
    for pid in sum(run.ray_processes().values(), []):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip())
        except OSError:
            continue
    return out


def _after_resume(case: Case, last: dict, run: Run, session: int, unit: str) -> None:
    wait_for(lambda: rel.ledger_has(case, session, "session") or run.ended(), 180)
    last["spend_after_restart"] = case.ledger().spent(unit)
    rows = by_number(snapshot(case.root))
    k = last["kill"]
    left = [n for n in last["running_at_kill"] if rows[n]["state"] == "running"]
    case.left_running += [f"trial {n} after kill {k}" for n in left]
    wrong = [n for n in last["running_at_kill"] if n not in left and not str(rows[n]["reason"] or "").startswith(RECOVERED)
             and not rows[n]["recovered"]]
    if wrong:
        case.fail(f"kill {k}: trials {wrong} running at the kill are not marked crashed / not run / recovered")
    delta = last["spend_after_restart"] - last["spend_at_kill"]
    if abs(delta) > 1.0:
        case.fail(f"kill {k}: the ledger's spend moved by {delta:.1f} s across the downtime")


# ------------------------------------------------------------------------------------------ main
CASES = {"a": ("kill -9 of the controller x{kills}", kill9_case),
         "b": ("SIGINT + resume x{sigints}", cases.sigint_case),
         "c": ("SIGKILL of a trial's worker x{worker_kills}", cases.worker_kill_case),
         "d": ("kill before tell (trial {tell_trial}) + resume", cases.tell_kill_case),
         "e": ("resume with only --budget", cases.settings_case)}


def main(argv=None) -> int:
    args = parse_args(argv)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    print(f"studies in {base}; cases {args.cases}, seed {args.seed}, budget {args.budget} (c, d: "
          f"{args.small_budget}; e: {args.settings_budget})", flush=True)
    done, elapsed = run_cases(CASES, args.cases, args, base, "kr-")
    table(done, elapsed)
    failed = [c for c in done if not c.ok()]
    out = Path(args.out or base / "kill_resume.json")
    out.write_text(json.dumps({"args": vars(args), "workdir": str(base), "ok": not failed, "cases": [
        {"case": c.title, "runs": c.runs, "lost": c.lost, "duplicated": c.duplicated, "paid_twice": c.paid_twice,
         "left_running": c.left_running, "failures": c.failures, "summary": c.summary, "notes": c.notes, "seconds": round(c.seconds, 1),
         "details": c.details} for c in done]}, indent=2, default=str))
    print(f"report: {out}")
    return 1 if failed else 0


def table(cases: list[Case], elapsed: float) -> None:
    head = (f"{'case':<40} {'runs':>4} {'completed lost':>14} {'duplicated':>10} {'paid twice':>10} "
            f"{'left RUNNING':>12} {'time s':>6}  notes")
    print("\n" + head + "\n" + "-" * len(head))
    for c in cases:
        lost_, dup, paid, left = c.counts()
        note = "; ".join([c.summary] * bool(c.summary) + [f"{len(c.notes)} note(s)"] * bool(c.notes)
                         + [f"{len(c.failures)} check(s) FAILED"] * bool(c.failures))
        print(f"{c.title:<40} {c.runs:>4} {lost_:>14} {dup:>10} {paid:>10} {left:>12} {c.seconds:>6.0f}  {note}")
    print(f"\n{elapsed:.0f} s in all")
    for c in cases:
        problems = [f"lost: {x}" for x in c.lost] + [f"duplicated: {x}" for x in c.duplicated] + \
                   [f"paid twice: {x}" for x in c.paid_twice] + [f"left RUNNING: {x}" for x in c.left_running] + \
                   c.failures + [f"note: {x}" for x in c.notes]
        for p in problems:
            print(f"  {c.key}) {p}")
    print("\n" + ("all checks passed" if all(c.ok() for c in cases) else "FAILED"))


if __name__ == "__main__":
    sys.exit(main())
