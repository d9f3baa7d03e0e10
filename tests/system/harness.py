r"""The system tests' harness: one ``allocsearch start`` as a subprocess in its own session (:class:`Run`), a
test's study folder and findings (:class:`Case`), read-only study snapshots, the checks every search test
shares (completed trials lost, duplicated, paid twice, left RUNNING: :func:`audit_end`), the Ray processes of
a run, and an ``mlflow server`` on loopback (:class:`MlflowServer`).

The tests' sizes come from environment variables (:class:`Knobs`, defaults in brackets): the defaults are
the full suite's coverage (about 40 min on 2 cores); smaller numbers give a quicker run (this one: 26.5 min
on 2 shared cores)::

    ALLOCSEARCH_RELIABILITY_KILLS=2 ALLOCSEARCH_RELIABILITY_SIGINTS=2 ALLOCSEARCH_RELIABILITY_BUDGETS=1cpu-min,2min \
        bash scripts/run_tests.sh -m system tests/system

    ALLOCSEARCH_RELIABILITY_KILLS          a) kill -9 of the controller, each followed by a resume [10]
    ALLOCSEARCH_RELIABILITY_SIGINTS        b) SIGINTs, each followed by a resume [5]
    ALLOCSEARCH_RELIABILITY_WORKER_KILLS   c) SIGKILLs of a running trial's Ray worker [3]
    ALLOCSEARCH_RELIABILITY_TELL_TRIAL     d) the trial whose controller is killed before Optuna's tell [1]
    ALLOCSEARCH_RELIABILITY_SEED           seed of the kill moments [0]
    ALLOCSEARCH_RELIABILITY_BUDGET         budget of a and b; f and g search half of it [6cpu-min]
    ALLOCSEARCH_RELIABILITY_SMALL_BUDGET   budget of c and d [1.5cpu-min]
    ALLOCSEARCH_RELIABILITY_SETTINGS_BUDGET  budget of e, one trial at a time (its resume doubles it) [0.4cpu-min]
    ALLOCSEARCH_RELIABILITY_BUDGETS        budget-accuracy searches, comma-separated [1cpu-min,2cpu-min,4cpu-min,2min]
    ALLOCSEARCH_RELIABILITY_STEPS          training steps per trial (~10-15 s at 100) [100]
    ALLOCSEARCH_RELIABILITY_DOWNTIME       a, d) seconds between a kill and the resume [10]
    ALLOCSEARCH_RELIABILITY_MIN_DELAY / _MAX_DELAY   a, b) a kill's moment, seconds after a (re)start [8 / 30]
    ALLOCSEARCH_RELIABILITY_STOP_TIMEOUT   b, f) seconds a SIGINT or a refused second start may take [120]
    ALLOCSEARCH_RELIABILITY_TIMEOUT        limit for a run to its end, seconds [900]
    ALLOCSEARCH_RELIABILITY_OUTAGE / _MAX_OUTAGE     g) least / most seconds the MLflow server stays down [10 / 40]
    ALLOCSEARCH_RELIABILITY_SERVER_TIMEOUT g) seconds the MLflow server may take to answer /health [120]
    ALLOCSEARCH_RELIABILITY_BAD_TIMEOUT    h) limit per bad input, seconds [120]

Searches are real (``allocsearch start ... --json`` on the random tiny-llama, trials of ~10-20 s), each test
in its own study under pytest's temp folder (kept for the last 3 runs, as pytest keeps them), run in their
own sessions with Ray's temp folder in a short folder under /tmp (Ray's socket paths have a length limit)
that is removed; HF, torch and allocsearch caches are the session's temp folders. Fault injection into the
controller itself is :mod:`faults` (``Run(..., fault=...)``), never a hook in allocsearch.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from allocsearch.reports.status import summarize
from allocsearch.search.bookkeeping import NO_RESULT
from allocsearch.study.folder import CRASHED, NOT_STARTED, Files, Study, trial_dir
from allocsearch.study.ledger import Ledger
from allocsearch.study.records import Attr, State
from allocsearch.study.storage import TrialStore

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # on a faulted controller's PYTHONPATH: ``import faults``
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
RECOVERED = (CRASHED, NOT_STARTED)  # Bookkeeper.recover's reasons
GENERIC = ("the trial's worker failed", NO_RESULT)
RAN = (State.COMPLETED, State.PRUNED, State.OOM, State.FAILED, State.CRASHED, State.RUNNING)
DONE = State.WITH_RESULT  # completed, pruned
DROPPED = ("admitted but not started when the search ended", "sampled when the search ended")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ENV_PREFIX = "ALLOCSEARCH_RELIABILITY_"


# ------------------------------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class Knobs:
    """The suite's sizes and limits (see the module docstring); ``from_env`` reads ALLOCSEARCH_RELIABILITY_*."""

    kills: int = 10
    sigints: int = 5
    worker_kills: int = 3
    tell_trial: int = 1
    seed: int = 0
    budget: str = "6cpu-min"
    small_budget: str = "1.5cpu-min"
    settings_budget: str = "0.4cpu-min"
    budgets: str = "1cpu-min,2cpu-min,4cpu-min,2min"
    steps: int = 100
    downtime: float = 10.0
    min_delay: float = 8.0
    max_delay: float = 30.0
    stop_timeout: float = 120.0
    timeout: float = 900.0
    outage: float = 10.0
    max_outage: float = 40.0
    server_timeout: float = 120.0
    bad_timeout: float = 120.0

    @classmethod
    def from_env(cls, environ=None) -> Knobs:
        from allocsearch.search.budget import Budget

        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            text = environ.get(name, "").strip()
            if not text:
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(text)
            except ValueError:
                raise ValueError(f"{name}={text!r}: expected {kind.__name__}") from None
            if kind is int and values[f.name] < 0:
                raise ValueError(f"{name}={text!r}: expected a number >= 0")
        knobs = cls(**values)
        for text in (knobs.budget, knobs.small_budget, knobs.settings_budget, *knobs.budget_list()):
            Budget.parse(text)  # a bad budget is a one-line error here, not a failed run
        return knobs

    def budget_list(self) -> list[str]:
        return [b.strip() for b in self.budgets.split(",") if b.strip()]


def scale(budget: str, factor: float) -> str:
    """A budget's number times ``factor``, same unit text (``6cpu-min`` x 0.5 -> ``3cpu-min``)."""
    m = re.match(r"^\s*([0-9.]+)\s*(.*)$", budget)
    return f"{float(m.group(1)) * factor:g}{m.group(2)}" if m else budget


# ------------------------------------------------------------------------------------------ a case
@dataclasses.dataclass
class Case:
    """One test's study folder, its runs, and what its checks found (the suite's table has a row per case)."""

    key: str
    title: str
    base: Path  # the session's folder (the model cache is shared)
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
        return Ledger(self.root / Files.LEDGER)

    def space(self, steps: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "space.yaml"
        path.write_text(SPACE.replace("STEPS", str(steps)).replace("EVERY", str(max(1, steps // 4))))
        return path

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"  [{self.key}] FAIL {text}", flush=True)

    def say(self, text: str) -> None:
        print(f"  [{self.key}] {text}", flush=True)

    def close_runs(self) -> None:
        """End every run of this case still going (a test that broke half-way leaves none behind)."""
        for run in list(self.live):
            run.close()

    def counts(self) -> tuple[int, int, int, int]:
        return len(self.lost), len(self.duplicated), len(self.paid_twice), len(self.left_running)

    def ok(self) -> bool:
        return not any(self.counts()) and not self.failures

    def problems(self) -> list[str]:
        return ([f"lost: {x}" for x in self.lost] + [f"duplicated: {x}" for x in self.duplicated]
                + [f"paid twice: {x}" for x in self.paid_twice] + [f"left RUNNING: {x}" for x in self.left_running]
                + [f"FAILED: {x}" for x in self.failures])

    def verify(self) -> None:
        """The test's verdict: 0 completed trials lost, 0 duplicated, 0 paid twice, 0 left RUNNING, and every
        other check passed (the notes are printed, not failures)."""
        for note in self.notes:
            print(f"  [{self.key}] note: {note}", flush=True)
        lost, dup, paid, left = self.counts()
        assert self.ok(), (f"{self.title} (study {self.root}): {lost} completed trials lost, {dup} duplicated, "
                           f"{paid} paid twice, {left} left RUNNING, {len(self.failures)} other checks failed:\n  "
                           + "\n  ".join(self.problems()))


# ------------------------------------------------------------------------------------------ processes
def run_env(cache: Path, tmp: Path | None = None, *, pythonpath: list[Path] | None = None) -> dict:
    """A subprocess's environment: Ray without auth, usage stats or a shared temp folder; MLflow without
    telemetry; HF offline; every cache in ``cache``; this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HOME": str(cache / "hf"), "ALLOCSEARCH_CACHE": str(cache / "allocsearch"),
                "TORCH_HOME": str(cache / "torch"), "XDG_CACHE_HOME": str(cache / "xdg"),
                "MPLCONFIGDIR": str(cache / "mpl"),
                "PYTHONPATH": os.pathsep.join([str(p) for p in (pythonpath or [])] + [str(REPO)]
                                              + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    if tmp is not None:
        env["TMPDIR"] = str(tmp)  # the run's Ray temp folder goes here
    return env


_RUNS = itertools.count(1)  # this session's runs, for their Ray temp folders


class Run:
    """One ``allocsearch start`` in its own session (so its Ray processes can be told apart by session id).
    ``fault``: a call of :mod:`faults` made in the controller before the CLI starts, e.g.
    ``"kill_before_tell(1)"`` (the controller runs as ``python -c "import faults; faults.<fault>; ..."``)."""

    def __init__(self, case: Case, args: list[str], *, fault: str | None = None):
        case.runs += 1
        self.case, self.index = case, case.runs
        self.tmp = case.ray_root / f"r{next(_RUNS)}"  # short: Ray's socket paths may not pass 107 bytes
        self.tmp.mkdir(parents=True)
        env = run_env(case.base / "cache", self.tmp, pythonpath=[HERE] if fault else None)
        if fault:
            code = f"import faults; faults.{fault}; from allocsearch.cli import main; main()"
            head = [sys.executable, "-c", code]
        else:
            head = [sys.executable, "-m", "allocsearch"]
        self.cmd = [*head, "start", "--workdir", str(case.dir), "--study", STUDY, "--json", *args]
        case.dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = case.dir / f"run{self.index}.out", case.dir / f"run{self.index}.err"
        self.stdout, self.stderr = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=self.stdout, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
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

    def stderr_lines(self) -> list[str]:
        return [ln for ln in self.err_path.read_text(errors="replace").splitlines() if ln.strip()]

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
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        left = [pid for pids in self.ray_processes().values() for pid in pids]
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


def process_titles(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip())
        except OSError:
            continue
    return out


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
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_for(predicate, timeout: float, poll: float = 0.25) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (bounded: never waits longer)."""
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


def wait_trial_running(case: Case, run: Run, session: int, timeout: float) -> bool:
    """A trial of ``session`` has started (its first ledger record) and one is RUNNING in the storage."""
    return wait_for(lambda: run.ended() or (first_start(case, session) is not None
                                            and bool(running(snapshot(case.root)))), timeout, poll=0.5) \
        and not run.ended()



# ------------------------------------------------------------------------------------------ the study
def snapshot(root: Path) -> dict:
    """Read-only: status's rows (plus the user attrs the checks need), the ledger's spend, the counts;
    no rows before the study exists."""
    if not (root / Files.SETTINGS).exists():
        return {"spent": 0.0, "budget": 0.0, "rows": [], "counts": {}}
    s = summarize(root)
    store = TrialStore.read(Study.open(root.parent, root.name))
    frozen = {t.number: t for t in store.trials()} if store is not None else {}
    rows = []
    for t in s["trials"]:
        ft = frozen.get(t["number"])
        attrs = ft.user_attrs if ft else {}
        params = t["params"] or ((ft.system_attrs.get("fixed_params") if ft else None) or {})  # queued
        rows.append({**{k: t[k] for k in ("number", "state", "objective", "reason", "retry_of", "prior",
                                          "intermediate", "spend", "seed", "confirm_of")},
                     "params": params, "recovered": attrs.get(Attr.RECOVERED), "session": attrs.get(Attr.SESSION),
                     "stop_reason": attrs.get(Attr.STOP_REASON), "oom_retry": attrs.get(Attr.OOM_RETRY)})
    return {"spent": s["budget"]["spent"], "budget": s["budget"]["total"], "rows": rows,
            "counts": {k: v for k, v in s["counts"].items() if v}, "best": s["best"]}


def by_number(snap: dict) -> dict[int, dict]:
    return {r["number"]: r for r in snap["rows"]}


def done(snap: dict) -> dict[int, dict]:
    return {r["number"]: r for r in snap["rows"] if r["state"] in DONE}


def running(snap: dict) -> list[int]:
    return [r["number"] for r in snap["rows"] if r["state"] == State.RUNNING]


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
            (original and target["state"] == State.CRASHED)  # a crash: once
            or str(target["reason"] or "").startswith("stopped by the user (")  # a user's stop: every time
            or (original and target["state"] == State.OOM and r["oom_retry"]))  # out of memory: once, half the batch
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
    """The checks of every search's last run: exit 0 with one JSON document and an end reason, spend within
    1.01 x budget, nothing running, no duplicates, nothing paid twice."""
    doc = run.check_json()
    if rc != 0 or not doc.get("end_reason"):
        case.fail(f"the last run did not finish cleanly: exit {rc}, end reason {doc.get('end_reason')!r} "
                  f"(stderr: {run.err_path})")
    if end["budget"] and end["spent"] / end["budget"] > 1.01:
        case.fail(f"spend {end['spent']:.1f} s is {end['spent'] / end['budget']:.3f} x the budget (> 1.01)")
    case.left_running += [f"trial {n} at the end" for n in running(end)]
    case.duplicated += duplicates(end)
    case.paid_twice += paid_twice(end, case.ledger())
    case.details["end"] = {"counts": end["counts"], "spent": end["spent"], "budget": end["budget"],
                           "end_reason": doc.get("end_reason"), "exit": rc}
    return doc


def dropped(end: dict, sessions: set[int]) -> list[str]:
    """Enqueued configurations (paper priors, retries) a user stop (in ``sessions``) dropped: told not-run
    and never enqueued again, so they never run."""
    out = []
    for r in end["rows"]:
        if r["state"] != State.NOT_RUN or r["reason"] not in DROPPED or r["session"] not in sessions:
            continue
        if r["prior"] is None and r["retry_of"] is None:
            continue  # a sampled configuration: the sampler draws another, nothing is owed
        again = [s for s in end["rows"] if s["number"] > r["number"] and s["params"] == r["params"]
                 and s["state"] != State.NOT_RUN]
        if not again:
            what = f"prior {r['prior']!r}" if r["prior"] else f"retry of trial {r['retry_of']}"
            out.append(f"trial {r['number']} ({what}) was told not_run ({r['reason']!r}) and never enqueued again")
    return out


def file_hashes(folder: Path, *, dirs: bool = False) -> dict[str, str]:
    """Every file under ``folder`` -> its sha256 (``dirs``: folders too, as 'dir'): proof nothing was written."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif dirs:
            out[key] = "dir" if p.is_dir() else "other"
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def spans(ledger: Ledger, session: int) -> list[tuple[int, float, float]]:
    """(number, first record, final record) of each trial of ``session``, by start time (epoch seconds)."""
    out: dict[int, list[float]] = {}
    for r in ledger.records():
        if r["kind"] == "trial" and r["session"] == session:
            span = out.setdefault(r["number"], [r["time"], r["time"]])
            span[1] = max(span[1], r["time"])
    return sorted(((n, s, e) for n, (s, e) in out.items()), key=lambda x: x[1])


def allocsearch_json(case: Case, *args: str, timeout: float = 120) -> tuple[dict | None, subprocess.CompletedProcess]:
    """``python -m allocsearch <args> --json`` (e.g. ``status``) on this case's study: (its document, the run)."""
    p = subprocess.run([sys.executable, "-m", "allocsearch", *args, "--workdir", str(case.dir), "--study", STUDY,
                        "--json"], check=False, cwd=REPO, env=run_env(case.base / "cache"), capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    try:
        return json.loads(p.stdout), p
    except ValueError:
        return None, p


# ------------------------------------------------------------------------------------------ MLflow
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own session, sqlite backend store in ``folder``; every start's
    wait is bounded and :meth:`kill` ends its whole process group."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.proc, self.starts = folder, port, None, 0
        self.uri = f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float) -> bool:
        self.kill()
        self.starts += 1
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.folder / f"server{self.starts}.log", "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}", "--workers", "1"],
                cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        return wait_for(lambda: self.proc.poll() is not None or self.healthy(), timeout, poll=0.5) \
            and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        self.proc = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ the table
COLUMNS = ("case", "runs", "completed trials lost", "duplicated", "paid twice", "left RUNNING", "notes")
REPORT: list[Case] = []  # every case of this session, in order (conftest prints the table)


def table_lines(cases: list[Case]) -> list[str]:
    rows = []
    for c in cases:
        notes = "; ".join([c.summary] * bool(c.summary) + [f"{len(c.notes)} note(s)"] * bool(c.notes)
                          + [f"{len(c.failures)} check(s) FAILED"] * bool(c.failures) + [f"{c.seconds:.0f} s"])
        rows.append(dict(zip(COLUMNS, (c.title, c.runs, *c.counts(), notes))))
    widths = {k: max([len(k)] + [len(str(r[k])) for r in rows]) for k in COLUMNS[:-1]}
    fmt = lambda r: " | ".join(str(r[k]).ljust(widths[k]) if k == "case" else str(r[k]).rjust(widths[k])
                               for k in COLUMNS[:-1])
    head = fmt({k: k for k in COLUMNS}) + " | notes"
    lines = [head, "-" * len(head)] + [fmt(r) + " | " + r["notes"] for r in rows]
    for c in cases:
        lines += [f"  {c.key}) {p}" for p in c.problems() + [f"note: {n}" for n in c.notes]]
    return lines
