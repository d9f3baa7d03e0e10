"""The harness of ``scripts/kill_resume.py``: one ``allocsearch start`` as a subprocess in its own session
(:class:`Run`), a case's study folder and findings (:class:`Case`), read-only study snapshots, and the
checks every case shares (completed trials lost, duplicated, paid twice, left RUNNING).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from allocsearch.reports.status import optuna_trials, summarize  # noqa: E402
from allocsearch.study.ledger import Ledger  # noqa: E402
from allocsearch.study.folder import Study, trial_dir  # noqa: E402

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
RECOVERED = ("the controller stopped", "sampled but not started")  # Study.recover's reasons
GENERIC = ("the trial's worker failed", "the trial's worker ended without a result")
RAN = ("completed", "pruned", "oom", "failed", "crashed", "running")
DONE = ("completed", "pruned")
DROPPED = ("admitted but not started when the search ended", "sampled when the search ended")
KILL_BEFORE_TELL = "ALLOCSEARCH_TEST_KILL_BEFORE_TELL"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ------------------------------------------------------------------------------------------ a case
@dataclasses.dataclass
class Case:
    """One row of the final table: its study folder, its runs, and what its checks found."""
    key: str
    title: str
    base: Path  # the whole check's folder (the model cache is shared)
    ray_root: Path  # short: Ray's socket paths have a length limit
    runs: int = 0
    lost: list = dataclasses.field(default_factory=list)
    duplicated: list = dataclasses.field(default_factory=list)
    paid_twice: list = dataclasses.field(default_factory=list)
    left_running: list = dataclasses.field(default_factory=list)
    failures: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    summary: str = ""  # the table's notes column
    live: list = dataclasses.field(default_factory=list)  # runs not closed yet

    @property
    def dir(self) -> Path:
        return self.base / self.key

    @property
    def root(self) -> Path:
        return self.dir / STUDY

    def ledger(self) -> Ledger:
        return Ledger(self.root / "ledger.jsonl")

    def space(self, steps: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "space.yaml"
        path.write_text(SPACE.replace("STEPS", str(steps)).replace("EVERY", str(max(1, steps // 4))))
        return path

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"  [{self.key}] FAIL {text}", flush=True)

    def close_runs(self) -> None:
        """End every run of this case still going (a case that broke half-way leaves none behind)."""
        for run in self.live:
            run.close()

    def say(self, text: str) -> None:
        print(f"  [{self.key}] {text}", flush=True)

    def counts(self) -> tuple[int, int, int, int]:
        return len(self.lost), len(self.duplicated), len(self.paid_twice), len(self.left_running)

    def ok(self) -> bool:
        return not any(self.counts()) and not self.failures


# ------------------------------------------------------------------------------------------ processes
class Run:
    """One ``allocsearch start`` in its own session (so its Ray processes can be told apart by session id)."""

    def __init__(self, case: Case, args: list[str], env: dict | None = None):
        case.runs += 1
        self.case, self.index = case, case.runs
        self.tmp = case.ray_root / f"{case.key}{self.index}"  # TMPDIR: the run's Ray temp folder goes here
        self.tmp.mkdir(parents=True)
        cache = case.base / "cache"
        full_env = {k: v for k, v in os.environ.items() if k != KILL_BEFORE_TELL}  # only where asked
        full_env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                         "TMPDIR": str(self.tmp), "HF_HOME": str(cache / "hf"), "ALLOCSEARCH_CACHE":
                         str(cache / "allocsearch"), "TORCH_HOME": str(cache / "torch"), "XDG_CACHE_HOME":
                         str(cache / "xdg"), "MPLCONFIGDIR": str(cache / "mpl"), **(env or {})})
        self.cmd = [sys.executable, "-m", "allocsearch", "start", "--workdir", str(case.dir), "--study", STUDY,
                    "--json", *args]
        case.dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = case.dir / f"run{self.index}.out", case.dir / f"run{self.index}.err"
        self.stdout, self.stderr = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=full_env, stdout=self.stdout, stderr=self.stderr,
                                     start_new_session=True)
        self.pid, self.started = self.proc.pid, time.monotonic()
        case.live.append(self)

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def summary(self) -> tuple[dict, list[str]]:
        """The JSON document on stdout, and any other lines there (``--json`` promises one document)."""
        lines = self.out_path.read_text(errors="replace").splitlines()
        first = next((i for i, ln in enumerate(lines) if ln.startswith("{")), None)
        if first is None:
            return {}, lines
        try:
            return json.loads("\n".join(lines[first:])), [ANSI.sub("", ln) for ln in lines[:first]]
        except ValueError:
            return {}, lines

    def check_json(self) -> dict:
        doc, extra = self.summary()
        if not doc:
            self.case.fail(f"run {self.index}: no JSON document on stdout ({self.out_path})")
        elif extra:
            self.case.fail(f"run {self.index}: 'start --json' stdout is not one JSON document: {len(extra)} "
                           f"line(s) before it, e.g. {extra[0][:90]!r}")
        return doc

    def ray_processes(self) -> dict[str, list[int]]:
        """Live (not zombie) processes of this run other than the controller, by kind."""
        out: dict[str, list[int]] = {"raylet": [], "gcs_server": [], "other": []}
        for pid, stat, cmdline in _processes():
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if pid == self.pid or fields[0] == "Z" or (int(fields[3]) != self.pid and str(self.tmp) not in cmdline):
                continue
            exe = cmdline.split(" ")[0]
            kind = "raylet" if exe.endswith("/raylet") else "gcs_server" if exe.endswith("/gcs_server") else "other"
            out[kind].append(pid)
        return out

    def close(self) -> int:
        """End the run and whatever of its Ray is left; returns how many leftover processes were killed."""
        if self in self.case.live:
            self.case.live.remove(self)
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        left = sum(self.ray_processes().values(), [])
        for pid in left:
            kill(pid)
        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return len(left)


def _processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield (int(entry.name), (entry / "stat").read_text(),
                       (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue


def worker_pid(root: Path, number: int) -> int | None:
    """The Ray worker running trial ``number``: a ``ray::`` process holding the trial's worker.err open."""
    target = str((trial_dir(root, number) / "worker.err").resolve())
    for pid, _, cmdline in _processes():
        if "ray::" not in cmdline:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                return pid
        except OSError:
            continue
    return None


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, poll: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def ledger_has(case: Case, session: int, kind: str) -> bool:
    return any(r["kind"] == kind and r["session"] == session for r in case.ledger().records())


def first_start(case: Case, session: int) -> float | None:
    """When (epoch) the first trial of ``session`` started (its zero ledger record), or None."""
    return next((r["time"] for r in case.ledger().records()
                 if r["kind"] == "trial" and r["session"] == session), None)


# ------------------------------------------------------------------------------------------ the study
def snapshot(root: Path) -> dict:
    """Read-only: status's rows (plus the user attrs the checks need), the ledger's spend, the counts;
    no rows before the study exists."""
    if not (root / "study.json").exists():
        return {"spent": 0.0, "budget": 0.0, "rows": [], "counts": {}}
    s = summarize(root)
    frozen = {t.number: t for t in optuna_trials(Study.open(root.parent, root.name))}
    rows = []
    for t in s["trials"]:
        ft = frozen.get(t["number"])
        attrs = ft.user_attrs if ft else {}
        params = t["params"] or ((ft.system_attrs.get("fixed_params") if ft else None) or {})  # queued
        rows.append({**{k: t[k] for k in ("number", "state", "objective", "reason", "retry_of", "prior",
                                          "intermediate", "spend")},
                     "params": params, "recovered": attrs.get("recovered"), "session": attrs.get("session"),
                     "stop_reason": attrs.get("stop_reason"), "oom_retry": attrs.get("oom_retry"),
                     "seed": attrs.get("seed", 0), "confirm": attrs.get("confirm")})
    return {"spent": s["budget"]["spent"], "budget": s["budget"]["total"], "rows": rows,
            "counts": {k: v for k, v in s["counts"].items() if v}}


def by_number(snap: dict) -> dict[int, dict]:
    return {r["number"]: r for r in snap["rows"]}


def done(snap: dict) -> dict[int, dict]:
    return {r["number"]: r for r in snap["rows"] if r["state"] in DONE}


def running(snap: dict) -> list[int]:
    return [r["number"] for r in snap["rows"] if r["state"] == "running"]


def lost(before: dict, after: dict) -> list[str]:
    """Completed/pruned trials of ``before`` missing, or changed in state or objective, in ``after``."""
    now = by_number(after)
    out = []
    for n, r in done(before).items():
        if n not in now:
            out.append(f"trial {n} ({r['state']}) is gone")
        elif (now[n]["state"], now[n]["objective"]) != (r["state"], r["objective"]):
            out.append(f"trial {n} {r['state']} {r['objective']} -> {now[n]['state']} {now[n]['objective']}")
    return out


def duplicates(snap: dict) -> list[str]:
    """Trial numbers twice; a configuration retried more than once, or a retry of what needed none."""
    rows, numbers = snap["rows"], by_number(snap)
    problems = [f"trial number {n} appears {c} times"
                for n, c in collections.Counter(r["number"] for r in rows).items() if c > 1]
    # a retry that never started is enqueued again with its retry_of: only the copies that ran count
    retries = collections.Counter(r["retry_of"] for r in rows if r["retry_of"] is not None and r["state"] in RAN)
    problems += [f"trial {n} retried {c} times" for n, c in retries.items() if c > 1]
    for r in (r for r in rows if r["retry_of"] is not None):
        target = numbers.get(r["retry_of"])
        original = target is not None and target["retry_of"] is None
        needs_retry = target is not None and (
            (original and target["state"] == "crashed")  # a crash: once
            or str(target["reason"] or "").startswith("stopped by the user (")  # a user's stop: every time
            or (original and target["state"] == "oom" and r["oom_retry"]))  # out of memory: once, half the batch
        if not needs_retry or (r["params"] and target["params"] != r["params"]):
            problems.append(f"trial {r['number']} retries trial {r['retry_of']}, which is not a crashed original, a "
                            f"user-stopped trial or an out-of-memory original with the same configuration")
    return problems


def paid_twice(snap: dict, ledger: Ledger) -> list[str]:
    """A completed/pruned configuration run again as a new trial on the same training seed (a re-run on a
    fresh seed, as the confirmation phase and a repeated draw do, measures seed noise: not paid twice); a
    trial number the ledger charges in two sessions (its final records, or any spend)."""
    out, seen = [], []
    for r in sorted(snap["rows"], key=lambda r: r["number"]):
        if r["state"] in RAN:
            twin = next((s for s in seen if s["params"] == r["params"] and s["seed"] == r["seed"]), None)
            if twin is not None:
                out.append(f"trial {r['number']} re-runs {twin['state']} trial {twin['number']}'s configuration "
                           f"on the same seed {r['seed']}")
        if r["state"] in DONE and r["params"]:
            seen.append(r)
    finals, charged = collections.defaultdict(set), collections.defaultdict(set)
    for rec in ledger.records():
        if rec["kind"] == "trial":
            charged[rec["number"]].add(rec["session"])
            if rec.get("final"):
                finals[rec["number"]].add(rec["session"])
    out += [f"trial {n}: final ledger records in sessions {sorted(s)}" for n, s in finals.items() if len(s) > 1]
    out += [f"trial {n}: ledger spend in sessions {sorted(s)}" for n, s in charged.items()
            if len(s) > 1 and len(finals.get(n, ())) < 2]
    return out


def audit_end(case: Case, end: dict, run: Run, rc: int | None) -> dict:
    """The checks of every case's last run: exit 0 with one JSON document and an end reason, spend within
    1.01 x budget, nothing running, no duplicates, nothing paid twice."""
    doc = run.check_json()
    if rc != 0 or not doc.get("end_reason"):
        case.fail(f"the last run did not finish cleanly: exit {rc}, end reason {doc.get('end_reason')!r}")
    if end["budget"] and end["spent"] / end["budget"] > 1.01:
        case.fail(f"spend {end['spent']:.1f} s is {end['spent'] / end['budget']:.3f} x the budget (> 1.01)")
    case.left_running += [f"trial {n} at the end" for n in running(end)]
    case.duplicated += duplicates(end)
    case.paid_twice += paid_twice(end, case.ledger())
    case.details["end"] = {"counts": end["counts"], "spent": end["spent"], "budget": end["budget"],
                           "end_reason": doc.get("end_reason"), "exit": rc}
    return doc


def run_cases(table: dict, keys, args, base: Path, ray_prefix: str) -> tuple[list[Case], float]:
    """Run the cases ``keys`` of ``table`` (key -> (title, fn(case, args, rng))) one after another, each in its
    own study under ``base`` with a seeded rng; a case that breaks is a failed check and the others still
    run. Ray's temp folder (short: its socket paths have a length limit) is removed. (cases, seconds)."""
    import random
    import tempfile
    import traceback

    ray_root = Path(tempfile.mkdtemp(prefix=ray_prefix, dir="/tmp"))
    t_all = time.monotonic()
    done: list[Case] = []
    try:
        for key in dict.fromkeys(keys):
            title, fn = table[key]
            case = Case(key, f"{key}) {title.format(**vars(args))}", base, ray_root)
            done.append(case)
            print(f"\n{case.title}", flush=True)
            t0 = time.monotonic()
            try:
                fn(case, args, random.Random(f"{args.seed}-{key}"))
            except Exception as exc:  # noqa: BLE001 - a broken case is a failed check, the others still run
                traceback.print_exc()
                case.fail(f"the case itself broke: {type(exc).__name__}: {exc}")
            finally:
                case.close_runs()
            case.seconds = time.monotonic() - t0
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
    return done, time.monotonic() - t_all
