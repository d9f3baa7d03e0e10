#!/usr/bin/env python3
"""The reliability suite of the search service in one command: kill -9 x10, SIGINT, worker SIGKILL, two
controllers on one study, the MLflow server down mid-search then back, the bad-input sweep. One table:
case | runs | completed trials lost | duplicated | paid twice | left RUNNING | notes; exit 1 if any count is
non-zero or any check fails, else 0.

    python3 scripts/reliability.py                       # all cases, defaults: about 20-25 min on 2 cores
    python3 scripts/reliability.py --cases fgh --budget 3cpu-min
    python3 scripts/reliability.py --cases a --kills 1 --out /tmp/a.json

Searches are real (``allocsearch start ... --json`` on the random tiny-llama, trials of ~10-20 s), each
case in its own study under ``--workdir``, as subprocesses in their own sessions; kill moments are seeded.

a-e) as scripts/kill_resume.py runs them (its ``kill9_case``, and reliability_cases.py): kill -9 of the
   controller x ``--kills`` with resumes; SIGINT + resume x ``--sigints``; SIGKILL of a trial's Ray worker
   x ``--worker-kills``; a kill between the ledger's final record and Optuna's tell, then a resume; a resume
   with only --budget keeps the stored settings.
f) two controllers on one study (reliability_more.py): while a search runs, a second ``allocsearch start``
   on the same --workdir/--study (the same command; a resume with a bigger --budget) must exit non-zero
   with one stderr line naming the problem and the fix, no traceback, and change no file (study.json and
   space.yaml hashes, controller.lock; the ledger only grows by the first controller's records); the first
   search ends normally.
g) ``mlflow server`` (127.0.0.1, a free port, sqlite backend store in the case folder) SIGKILLed while a
   trial runs, down at least ``--outage`` s and until a trial has ended meanwhile, then back on the same
   port and store before the search ends; nothing lost, and every completed/pruned trial is a finished
   nested MLflow run of the study's parent run with its objective (missing ones count as lost).
h) every bad input of tests/test_bad_inputs.py (its CASES; reliability_inputs.py) as ``python3 -m allocsearch ...`` in a fresh
   folder: non-zero exit, exactly one stderr line naming the problem or the fix, no traceback, nothing on
   stdout, nothing written.

Cases a and b search ``--budget``; f and g half of it; c and d ``--small-budget``; e ``--settings-budget``.
Every search case's last run must exit 0 with one JSON document and spend <= 1.01 x its budget. The studies
stay in ``--workdir`` (default: a new temp folder); Ray's temp folders are removed, the MLflow server is
always killed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kill_resume  # noqa: E402  (cases a-e: its kill9_case and CASES table)
import reliability_inputs  # noqa: E402
import reliability_more as more  # noqa: E402
from reliability_harness import Case, run_cases  # noqa: E402

CASES = {**kill_resume.CASES,
         "f": ("two controllers on one study", more.two_controllers_case),
         "g": ("MLflow server down mid-search, then back", more.mlflow_outage_case),
         "h": ("bad-input sweep", reliability_inputs.bad_input_case)}
COLUMNS = ("case", "runs", "completed trials lost", "duplicated", "paid twice", "left RUNNING", "notes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="scripts/reliability.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python3 scripts/reliability.py --cases abcdefgh --kills 10 --sigints 5 --worker-kills 3 "
               "--seed 0 --budget 6cpu-min --out /tmp/reliability.json\n  python3 scripts/reliability.py --cases fgh "
               "--budget 3cpu-min        # a short run: about 5 min\n\ncases:\n" + "\n".join(
                   f"  {k}) {t.format(kills='N', sigints='N', worker_kills='N', tell_trial='N')}"
                   for k, (t, _) in CASES.items()))
    p.add_argument("--cases", default="abcdefgh", help="which cases to run, e.g. abcdefgh or fgh (default all)")
    p.add_argument("--kills", type=int, default=10, help="a) SIGKILLs of the controller (default 10)")
    p.add_argument("--sigints", type=int, default=5, help="b) SIGINTs, each followed by a resume (default 5)")
    p.add_argument("--worker-kills", type=int, default=3, help="c) SIGKILLs of a trial's Ray worker (default 3)")
    p.add_argument("--tell-trial", type=int, default=1, help="d) the trial killed before its tell (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--budget", default="6cpu-min", help="budget of cases a and b; f and g search half of it "
                   "(default 6cpu-min)")
    p.add_argument("--small-budget", default="1.5cpu-min", help="budget of cases c and d (default 1.5cpu-min)")
    p.add_argument("--settings-budget", default="0.4cpu-min", help="budget of case e, one trial at a time "
                   "(default 0.4cpu-min; its resume doubles it)")
    p.add_argument("--downtime", type=float, default=10.0, help="a, d) seconds between a kill and the resume "
                   "(default 10)")
    p.add_argument("--min-delay", type=float, default=8.0, help="earliest kill, seconds after a (re)start (default 8)")
    p.add_argument("--max-delay", type=float, default=30.0, help="latest kill, seconds after a (re)start (default 30)")
    p.add_argument("--steps", type=int, default=100, help="training steps per trial (default 100: ~10-15 s)")
    p.add_argument("--stop-timeout", type=float, default=120.0, help="seconds a SIGINT (b) or a refused second "
                   "start (f) may take (default 120)")
    p.add_argument("--timeout", type=float, default=900.0, help="limit for a run to its end, seconds (default 900)")
    p.add_argument("--outage", type=float, default=10.0, help="g) least seconds the MLflow server stays down "
                   "(default 10)")
    p.add_argument("--max-outage", type=float, default=40.0, help="g) most seconds it stays down waiting for a "
                   "trial to end meanwhile (default 40)")
    p.add_argument("--server-timeout", type=float, default=120.0, help="g) seconds the MLflow server may take "
                   "to answer /health (default 120)")
    p.add_argument("--bad-jobs", type=int, default=2, help="h) bad inputs run at once (default 2)")
    p.add_argument("--bad-timeout", type=float, default=120.0, help="h) limit per bad input, seconds (default 120)")
    p.add_argument("--workdir", default=None, help="where the studies go (default: a new temp folder)")
    p.add_argument("--out", default=None, help="the table as JSON (default: <workdir>/reliability.json)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        p.error(f"--cases {args.cases!r}: unknown case(s) {unknown}; fix: letters of {''.join(CASES)}")
    from allocsearch.errors import AllocsearchError
    from allocsearch.search.budget import Budget

    for flag in ("budget", "small_budget", "settings_budget"):
        try:
            Budget.parse(getattr(args, flag))
        except AllocsearchError as exc:
            p.error(f"--{flag.replace('_', '-')}: {exc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="reliability-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    print(f"studies in {base}; cases {args.cases}, seed {args.seed}, budget {args.budget} (f, g: "
          f"{more.half(args.budget)}; c, d: {args.small_budget}; e: {args.settings_budget})", flush=True)
    done, elapsed = run_cases(CASES, args.cases, args, base, "rl-")
    rows = table_rows(done)
    print_table(rows, done, elapsed)
    failed = [c for c in done if not c.ok()]
    out = Path(args.out or base / "reliability.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "workdir": str(base), "ok": not failed, "seconds": round(elapsed, 1),
        "columns": list(COLUMNS), "table": rows,
        "cases": [{"case": c.title, "runs": c.runs, "lost": c.lost, "duplicated": c.duplicated,
                   "paid_twice": c.paid_twice, "left_running": c.left_running, "failures": c.failures,
                   "summary": c.summary, "notes": c.notes, "seconds": round(c.seconds, 1), "details": c.details}
                  for c in done]}, indent=2, default=str))
    print(f"report: {out}")
    return 1 if failed else 0


def table_rows(cases: list[Case]) -> list[dict]:
    rows = []
    for c in cases:
        lost, dup, paid, left = c.counts()
        notes = "; ".join([c.summary] * bool(c.summary) + [f"{len(c.notes)} note(s)"] * bool(c.notes)
                          + [f"{len(c.failures)} check(s) FAILED"] * bool(c.failures) + [f"{c.seconds:.0f} s"])
        rows.append(dict(zip(COLUMNS, (c.title, c.runs, lost, dup, paid, left, notes))))
    return rows


def print_table(rows: list[dict], cases: list[Case], elapsed: float) -> None:
    widths = {k: max([len(k)] + [len(str(r[k])) for r in rows]) for k in COLUMNS[:-1]}
    head = " | ".join(k.ljust(widths[k]) if k == "case" else k.rjust(widths[k]) for k in COLUMNS[:-1]) + " | notes"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(" | ".join(str(r[k]).ljust(widths[k]) if k == "case" else str(r[k]).rjust(widths[k])
                         for k in COLUMNS[:-1]) + " | " + r["notes"])
    print(f"\n{elapsed:.0f} s in all")
    for c in cases:
        problems = ([f"lost: {x}" for x in c.lost] + [f"duplicated: {x}" for x in c.duplicated]
                    + [f"paid twice: {x}" for x in c.paid_twice] + [f"left RUNNING: {x}" for x in c.left_running]
                    + [f"FAILED: {x}" for x in c.failures] + [f"note: {x}" for x in c.notes])
        for p in problems:
            print(f"  {c.key}) {p}")
    print("\n" + ("all checks passed" if all(c.ok() for c in cases) else "FAILED"))


if __name__ == "__main__":
    sys.exit(main())
