#!/usr/bin/env python3
"""Prove that a search survives ``kill -9`` of its controller: nothing lost, nothing duplicated, no spend
for the downtime, no trial left RUNNING, no Ray process left behind.

    python3 scripts/kill_resume.py --kills 5 --seed 0 --budget 4cpu-min [--downtime 10] [--out report.json]

It runs a real search (``allocsearch start ... --json`` on the random tiny-llama, trials of ~10-20 s) as a
subprocess in its own session, and N times, at a seeded random moment 8-30 s after the (re)start but never
before a trial of that run has started, sends SIGKILL to the controller process only. After each kill it
snapshots the study read-only (``allocsearch.analysis.summarize`` and the ledger), counts that run's Ray
processes (and kills any left, saying so), waits ``--downtime`` seconds, and resumes with ``start`` on the
same study. After the last kill the search runs to its end. Checks (any failure: exit 1):

* completed/pruned trials at a kill are all still there, same state and objective, at the next kill/end;
* trial numbers are unique; a crashed trial's configuration is retried at most once, never a retry's;
* the ledger's spend at the resumed session's start equals its spend at the kill (downtime is not spent);
* trials RUNNING at a kill are marked crashed / not run ("the controller stopped ...") once resumed;
* no raylet / gcs_server of a killed run survives the downtime;
* the last run exits 0 with an end reason, spend <= 1.01 x budget, and no trial is left running.

The study stays in ``--workdir`` (default: a new temp folder); Ray's temp folders are removed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from allocsearch.analysis import summarize  # noqa: E402
from allocsearch.search.ledger import Ledger  # noqa: E402

STUDY = "killtest"
SPACE = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 64, validation: 16, test: 16}]}
train: {steps: STEPS, batch_size: 4, max_length: 64, eval_every: EVERY, eval_examples: 16, lr: {float: [1.0e-4, 1.0e-2], log: true}}
methods:
  mola: {experts: {shape: {choice: [rectangle, inverted_triangle]}, per_layer: {int: [1, 3]}}, top_k: {int: [1, 2]}, rank: {choice: [2, 4]}}
  lora: {rank: {choice: [2, 4]}}
"""
RECOVERED = ("the controller stopped", "sampled but not started")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python3 scripts/kill_resume.py --kills 5 --seed 0 --budget 4cpu-min "
                                       "--out /tmp/kill_resume.json")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs of the controller (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--budget", default="4cpu-min", help="search budget (default 4cpu-min)")
    p.add_argument("--downtime", type=float, default=10.0, help="seconds between a kill and the resume (default 10)")
    p.add_argument("--min-delay", type=float, default=8.0, help="earliest kill, seconds after a (re)start (default 8)")
    p.add_argument("--max-delay", type=float, default=30.0, help="latest kill, seconds after a (re)start (default 30)")
    p.add_argument("--steps", type=int, default=100, help="training steps per trial (default 100: ~10-15 s)")
    p.add_argument("--workdir", default=None, help="where the study goes (default: a new temp folder)")
    p.add_argument("--out", default=None, help="JSON report (default: <workdir>/kill_resume.json)")
    p.add_argument("--timeout", type=float, default=1800.0, help="limit for the last run, seconds (default 1800)")
    return p.parse_args()


# ------------------------------------------------------------------------------------------ processes
class Run:
    """One ``allocsearch start`` in its own session (so its Ray processes can be told apart by session id)."""

    def __init__(self, index: int, args, base: Path, space: Path, ray_root: Path):
        self.tmp = ray_root / str(index)  # TMPDIR: the run's Ray temp folder (as-ray-*) goes here
        self.tmp.mkdir()
        cache = base / "cache"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(self.tmp),
               "HF_HOME": str(cache / "hf"), "ALLOCSEARCH_CACHE": str(cache / "allocsearch"),
               "TORCH_HOME": str(cache / "torch"), "XDG_CACHE_HOME": str(cache / "xdg"), "MPLCONFIGDIR": str(cache / "mpl")}
        cmd = [sys.executable, "-m", "allocsearch", "start", "--budget", args.budget, "--space", str(space),
               "--workdir", str(base), "--study", STUDY, "--json"]
        self.stdout, self.stderr = open(base / f"run{index}.out", "w"), open(base / f"run{index}.err", "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.stdout, stderr=self.stderr,
                                     start_new_session=True)
        self.pid, self.started = self.proc.pid, time.monotonic()

    def ray_processes(self) -> dict[str, list[int]]:
        """Live (not zombie) processes of this run other than the controller, by kind."""
        out: dict[str, list[int]] = {"raylet": [], "gcs_server": [], "other": []}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if fields[0] == "Z" or (int(fields[3]) != self.pid and str(self.tmp) not in cmdline):
                continue
            exe = cmdline.split(" ")[0]
            kind = "raylet" if exe.endswith("/raylet") else "gcs_server" if exe.endswith("/gcs_server") else "other"
            out[kind].append(int(entry.name))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in sum(self.ray_processes().values(), []):
            _kill(pid)
        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, poll: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


# ------------------------------------------------------------------------------------------ the study
def snapshot(root: Path, unit: str) -> dict:
    s = summarize(root)
    rows = [{k: t[k] for k in ("number", "state", "objective", "reason", "retry_of", "params")} for t in s["trials"]]
    return {"spent": Ledger(root / "ledger.jsonl").spent(unit), "budget": s["budget"]["total"], "rows": rows,
            "counts": {k: v for k, v in s["counts"].items() if v}}


def done(snap: dict) -> dict[int, dict]:
    return {r["number"]: r for r in snap["rows"] if r["state"] in ("completed", "pruned")}


def compare(before: dict, after: dict) -> dict:
    """Completed/pruned trials of ``before`` missing or changed in ``after``; duplicates in ``after``."""
    now = {r["number"]: r for r in after["rows"]}
    lost = [n for n in done(before) if n not in now]
    changed = [n for n, r in done(before).items() if n in now and
               (now[n]["state"], now[n]["objective"]) != (r["state"], r["objective"])]
    return {"done_before": len(done(before)), "done_after": len(done(after)), "lost": lost, "changed": changed,
            "duplicates": duplicates(after)}


def duplicates(snap: dict) -> list[str]:
    rows = snap["rows"]
    by_number = {r["number"]: r for r in rows}
    problems = [f"trial number {n} appears {c} times"
                for n, c in collections.Counter(r["number"] for r in rows).items() if c > 1]
    # a retry that never started is enqueued again with its retry_of: only the copies that ran count
    retries = collections.Counter(r["retry_of"] for r in rows if r["retry_of"] is not None and r["state"] != "not_run")
    problems += [f"trial {n} retried {c} times" for n, c in retries.items() if c > 1]
    for r in (r for r in rows if r["retry_of"] is not None):
        target = by_number.get(r["retry_of"])
        same = target is not None and (not r["params"] or target["params"] == r["params"])  # queued: no params
        if not same or target["retry_of"] is not None or target["state"] != "crashed":
            problems.append(f"trial {r['number']} retries trial {r['retry_of']}, which is not a crashed original "
                            f"with the same configuration")
    return problems


def ledger_has(path: Path, session: int, kind: str) -> bool:
    return any(r["kind"] == kind and r["session"] == session for r in Ledger(path).records())


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    ray_root = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    space = base / "space.yaml"
    space.write_text(SPACE.replace("STEPS", str(args.steps)).replace("EVERY", str(max(1, args.steps // 4))))
    root, ledger = base / STUDY, base / STUDY / "ledger.jsonl"
    from allocsearch.search.budget import Budget

    unit = Budget.parse(args.budget).unit
    kills: list[dict] = []
    notes: list[str] = []
    final: dict = {}
    t_all = time.monotonic()
    print(f"study in {base / STUDY}; budget {args.budget}, {args.kills} kills, seed {args.seed}", flush=True)
    try:
        for k in range(args.kills + 1):
            session = Ledger(ledger).next_session()  # the session number this run's controller will take
            run = Run(k, args, base, space, ray_root)
            if kills:  # a resume: the new controller recovers the study, then writes its session record
                last = kills[-1]
                wait_for(lambda: ledger_has(ledger, session, "session") or run.proc.poll() is not None, 180)
                last["spend_after_restart"] = Ledger(ledger).spent(unit)
                resumed = snapshot(root, unit)
                rows = {r["number"]: r for r in resumed["rows"]}
                last["left_running"] = [n for n in last["running_at_kill"] if rows[n]["state"] == "running"]
                last["not_recovered"] = [n for n in last["running_at_kill"] if n not in last["left_running"]
                                         and not str(rows[n]["reason"] or "").startswith(RECOVERED)]
                last["retried"] = sorted(r["retry_of"] for r in resumed["rows"] if r["retry_of"] in last["running_at_kill"])
            if k == args.kills:
                break
            delay = rng.uniform(args.min_delay, args.max_delay)
            wait_for(lambda: run.proc.poll() is not None or (time.monotonic() - run.started >= delay
                                                               and ledger_has(ledger, session, "trial")), 600)
            if run.proc.poll() is not None:
                notes.append(f"run {k} ended (exit {run.proc.returncode}) before kill {k + 1}; no more kills")
                break
            at = time.monotonic() - run.started
            ray_before = run.ray_processes()
            os.kill(run.pid, signal.SIGKILL)  # the controller only, not its process group
            killed_at = time.time()
            run.proc.wait()
            time.sleep(1.0)
            ray_after_kill = run.ray_processes()
            snap = snapshot(root, unit)
            records = Ledger(ledger).records()
            rec = {"kill": k + 1, "at_s": round(at, 1), "delay_drawn_s": round(delay, 1), "session": session,
                   "snapshot": snap, "spend_at_kill": snap["spent"],
                   "ledger_lag_s": round(killed_at - max(r["time"] for r in records), 2) if records else None,
                   "running_at_kill": [r["number"] for r in snap["rows"] if r["state"] == "running"],
                   "ray_before_kill": {kind: len(p) for kind, p in ray_before.items()},
                   "ray_after_kill": {kind: len(p) for kind, p in ray_after_kill.items()}}
            if kills:
                kills[-1]["next"] = compare(kills[-1]["snapshot"], snap)
            time.sleep(args.downtime)
            left = run.ray_processes()
            rec["ray_after_downtime"] = {kind: len(p) for kind, p in left.items()}
            if any(left.values()):
                for pid in sum(left.values(), []):
                    _kill(pid)
                notes.append(f"kill {k + 1}: killed {sum(map(len, left.values()))} Ray processes the killed "
                             f"controller left behind ({', '.join(f'{len(v)} {n}' for n, v in left.items() if v)})")
            rec["spend_before_restart"] = Ledger(ledger).spent(unit)
            run.close()
            kills.append(rec)
        # the last run goes to its end
        try:
            run.proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            notes.append(f"the last run did not end within {args.timeout:g} s; killed")
        run.close()
        out_text = Path(run.stdout.name).read_text()
        summary = json.loads(out_text) if out_text.strip() else {}
        end = snapshot(root, unit)
        if kills and "next" not in kills[-1]:
            kills[-1]["next"] = compare(kills[-1]["snapshot"], end)
        final = {"exit": run.proc.returncode, "end_reason": summary.get("end_reason"), "spent": end["spent"],
                 "budget": end["budget"], "fraction": end["spent"] / end["budget"], "counts": end["counts"],
                 "trials": len(end["rows"]), "duplicates": duplicates(end),
                 "running": [r["number"] for r in end["rows"] if r["state"] == "running"],
                 "elapsed_s": round(time.monotonic() - t_all, 1)}
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    if kills and not any(r.get("next", {}).get("done_before") for r in kills):
        notes.append("no trial had completed at any kill: the 'nothing lost' check was vacuous (raise --max-delay)")
    failures = checks(kills, final)
    report(kills, final, notes, failures)
    out = Path(args.out or base / "kill_resume.json")
    for rec in kills:
        rec["snapshot"] = {"counts": rec["snapshot"]["counts"], "spent": rec["snapshot"]["spent"]}
    out.write_text(json.dumps({"args": vars(args), "study": str(root), "kills": kills, "final": final,
                               "notes": notes, "failures": failures, "ok": not failures}, indent=2, default=str))
    print(f"report: {out}")
    return 1 if failures else 0


def checks(kills: list[dict], final: dict) -> list[str]:
    fails = []
    for r in kills:
        k, nxt = r["kill"], r.get("next", {})
        for key, what in (("lost", "completed/pruned trials lost"), ("changed", "trials changed state/objective")):
            if nxt.get(key):
                fails.append(f"kill {k}: {what}: {nxt[key]}")
        fails += [f"kill {k}: {p}" for p in nxt.get("duplicates", [])]
        if "spend_after_restart" not in r:
            fails.append(f"kill {k}: no resumed session was seen")
            continue
        delta = r["spend_after_restart"] - r["spend_at_kill"]
        if abs(delta) > 1.0:
            fails.append(f"kill {k}: the ledger's spend moved by {delta:.1f} s across the downtime")
        if r["left_running"] or r["not_recovered"]:
            fails.append(f"kill {k}: after resume, left RUNNING {r['left_running']}, not marked recovered "
                         f"{r['not_recovered']}")
        if r["ray_after_downtime"]["raylet"] or r["ray_after_downtime"]["gcs_server"]:
            fails.append(f"kill {k}: raylet/gcs_server survived the killed controller: {r['ray_after_downtime']}")
    if final.get("exit") != 0 or not final.get("end_reason"):
        fails.append(f"the last run did not finish cleanly: exit {final.get('exit')}, end reason "
                     f"{final.get('end_reason')!r}")
    if final and final["fraction"] > 1.01:
        fails.append(f"final spend {final['spent']:.1f} s is {final['fraction']:.4f} x the budget (> 1.01)")
    if final.get("running") or final.get("duplicates"):
        fails.append(f"at the end: running {final.get('running')}, duplicates {final.get('duplicates')}")
    return fails


def report(kills: list[dict], final: dict, notes: list[str], failures: list[str]) -> None:
    head = (f"{'kill':>4} {'at s':>5} {'sess':>4} {'done@kill':>9} {'@next':>5} {'lost':>4} {'dup':>3} "
            f"{'run@kill':>9} {'left':>4} {'retried':>7} {'spend@kill':>10} {'@restart':>9} {'delta':>6} "
            f"{'lag s':>5} {'ray after kill r/g/o':>20} {'after downtime':>14}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in kills:
        nxt = r.get("next", {})
        ray = lambda d: "/".join(str(d[x]) for x in ("raylet", "gcs_server", "other"))  # noqa: E731
        after = r.get("spend_after_restart")
        print(f"{r['kill']:>4} {r['at_s']:>5} {r['session']:>4} {nxt.get('done_before', '-'):>9} "
              f"{nxt.get('done_after', '-'):>5} {len(nxt.get('lost', [])) + len(nxt.get('changed', [])):>4} "
              f"{len(nxt.get('duplicates', [])):>3} {str(r['running_at_kill']):>9} {len(r.get('left_running', [])):>4} "
              f"{str(r.get('retried', '-')):>7} {r['spend_at_kill']:>10.1f} "
              f"{after if after is None else format(after, '.1f'):>9} "
              f"{'-' if after is None else format(after - r['spend_at_kill'], '.2f'):>6} {str(r['ledger_lag_s']):>5} "
              f"{ray(r['ray_after_kill']):>20} {ray(r['ray_after_downtime']):>14}")
    if final:
        print(f"\nend: exit {final['exit']}, {final['end_reason']!r}\n     spend {final['spent']:.1f} s of "
              f"{final['budget']:.0f} s = {final['fraction']:.4f} x budget; {final['trials']} trials: "
              f"{final['counts']}; {final['elapsed_s']} s in all")
    for n in notes:
        print(f"note: {n}")
    print("\n" + ("FAILED:\n  " + "\n  ".join(failures) if failures else "all checks passed"))


if __name__ == "__main__":
    sys.exit(main())
