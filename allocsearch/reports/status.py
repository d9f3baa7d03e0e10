"""Read-only queries over study directories: what ``allocsearch status`` (and the dashboard) show.

Nothing here writes: a study that is running, finished, half-written or missing its Optuna database is
summarised as far as it can be, and problems come back as one-line ``StudyError`` messages.
"""
from __future__ import annotations

import datetime as dt
import statistics
from pathlib import Path
from typing import Any

from allocsearch.search.budget import Budget
from allocsearch.search.rungs import agreement
from allocsearch.study.choice import best_of, configuration_score
from allocsearch.study.confidence import evidence
from allocsearch.study.folder import Files, Study, StudyError, directions, metric_names
from allocsearch.study.ledger import Ledger
from allocsearch.study.records import State, TrialRecord
from allocsearch.study.storage import TrialStore

STATE_ORDER = State.ALL


def load_records(study: Study) -> list[TrialRecord]:
    """The study's trials, each with its spend as the ledger charged it ([] before the first trial). A storage
    that cannot be read is a one-line ``StudyError``; nothing is created or written."""
    store = TrialStore.read(study)
    return store.records(study.ledger.trial_spend()) if store is not None else []


def records_in(summary: dict) -> list[TrialRecord]:
    """The ``TrialRecord`` s of a summary's ``trials`` (its JSON-able rows)."""
    return [TrialRecord(**t) for t in summary["trials"]]


def summarize(root: str | Path, prefer: str | None = None) -> dict[str, Any]:
    """Everything ``status`` prints, as a JSON-able dict; ``best`` is the study's one best (``choice.best_of``:
    the configuration to export, scored by its mean over seeds) by the study's preference, or ``prefer``;
    ``cheapest``: the cheapest configuration tied with the winner (what ``--prefer cheapest`` exports)."""
    root = Path(root)
    study = Study.open(root.parent, root.name)
    s = study.settings
    budget = Budget.from_dict(s["budget"])
    spent = study.ledger.spent(budget.unit)
    records = load_records(study)
    counts = {state: sum(r.state == state for r in records) for state in STATE_ORDER}
    prefer = prefer or s.get("prefer") or "best"
    best, cheapest = best_of(records, s.get("noise"), prefer), best_of(records, s.get("noise"), "cheapest")
    predicted = [r.predicted for r in records if r.predicted]
    out = {"study": study.name, "root": str(root), "model": s["model"], "space": s.get("space"),
           "objectives": s["objectives"], "sampler": s.get("sampler"), "scheduler": s.get("scheduler"),
           "budget": {"text": budget.text, "unit": budget.unit, "total": budget.seconds, "spent": spent,
                      "fraction": spent / budget.seconds if budget.seconds else None,
                      "overshoot": max(0.0, spent - budget.seconds),
                      "predicted_per_trial": statistics.median(predicted[-10:]) if predicted else None,
                      "describe": budget.describe(), "spent_text": budget.format(spent)},
           "counts": counts, "trials": [r.to_dict() for r in records], "best": best.to_dict() if best else None,
           "prefer": prefer, "cheapest": cheapest.to_dict() if cheapest else None,
           "baseline": _baseline(records), "controller_pid": study.running_pid(), "declared_noise": s.get("noise"),
           "confirm": float(s.get("confirm") or 0.0)}
    if len(s["objectives"]) == 1:
        out["evidence"] = _evidence(records, s.get("noise"))
        if s.get("scheduler", "asha") == "asha":
            out["rungs"] = agreement(records)
    if len(s["objectives"]) > 1:
        out["pareto"] = [r.to_dict() for r in pareto_front([r for r in records if r.completed], s["objectives"])]
    return out


def _baseline(records: list[TrialRecord]) -> dict | None:
    """The LoRA prior (the papers' plain baseline) with its mean over seeds, for "vs the LoRA prior"."""
    row = next((r for r in records if r.completed and (r.prior or "").lower().startswith("lora")), None)
    if row is None:
        return None
    value, n = configuration_score(records, row.number)
    return {"trial": row.number, "value": value, "n": n, "summary": row.summary}


def _evidence(records: list[TrialRecord], noise: float | None) -> dict | None:
    """The winner's evidence (``allocsearch.study.confidence.evidence``), with each finalist's summary line."""
    ev = evidence(records, noise)
    if ev is None:
        return None
    summaries = {r.number: r.summary for r in records}
    for e in [ev["winner"], *ev["finalists"], *ev["tied"]]:
        e["summary"] = summaries.get(e["trials"][0], "")
    return ev


def finalists_table(summary: dict) -> list[dict]:
    """The dashboard's finalists: one row per configuration in the evidence (the winner first), its mean,
    95% CI half width, n, seeds, trials and mark (winner / tied / '')."""
    ev = summary.get("evidence")
    if not ev:
        return []
    from allocsearch.study.confidence import finalist_mark

    out = []
    for f in ev["finalists"]:
        mark = finalist_mark(f, ev)
        out.append({"mark": mark, "summary": f.get("summary", ""), "mean": f["mean"], "ci95": f["ci95"], "n": f["n"],
                    "seeds": f["seeds"], "trials": f["trials"]})
    return out


def pareto_front(trials: list[TrialRecord], objectives: list[str]) -> list[TrialRecord]:
    """The completed trials no other completed trial beats on every objective."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions(objectives)]
    pts = [(t, [sg * v for sg, v in zip(signs, t.values)]) for t in trials if t.values]

    def dominated(p, q):  # q dominates p
        return all(b >= a for a, b in zip(p, q)) and any(b > a for a, b in zip(p, q))

    front = [t for t, p in pts if not any(dominated(p, q) for _, q in pts)]
    return sorted(front, key=lambda t: -t.values[0])


def objective_names(objectives: list[str]) -> list[str]:
    return metric_names(objectives)



# ------------------------------------------------------------------------------------------ the dashboard
# What the dashboard pages show, as plain JSON-able values. A study that cannot be read becomes a
# message (``inspect_study``), never an exception the page has to handle.
_STUDY_FILES = (Files.SETTINGS, Files.SPACE, Files.OPTUNA, Files.LEDGER, Files.TRIALS)


def study_dirs(workdir: str | Path) -> list[str]:
    """Folders of ``workdir`` that hold a study, complete or not (``Study.list`` only lists complete
    ones): the dashboard shows a half-written or corrupt study with its problem instead of hiding it."""
    base = Path(workdir)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any((p / f).exists() for f in _STUDY_FILES))


def study_signature(root: str | Path) -> tuple:
    """Changes whenever anything a page reads changes (sizes and mtimes): a cache key for live pages."""
    root = Path(root)
    out = []
    for name in (Files.SETTINGS, Files.OPTUNA, Files.OPTUNA + "-journal", Files.LEDGER, Files.LOCK, Files.STOP):
        try:
            st = (root / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def inspect_study(root: str | Path) -> dict[str, Any]:
    """``{"status", "message", "summary"}``: status ``ok`` (summary as ``summarize``), ``empty`` (no trial
    yet; summary still there), ``half_written`` (no study.json), ``corrupt`` or ``missing``."""
    root = Path(root)
    name = root.name
    if not root.is_dir():
        return {"status": "missing", "message": f"no study folder {root}", "summary": None}
    if not (root / Files.SETTINGS).is_file():
        return {"status": "half_written", "summary": None,
                "message": f"study {name!r} is half-written: {root}/{Files.SETTINGS} is missing (a start that was "
                           f"interrupted before the study was created, or a deleted file); fix: start it again "
                           f"with 'allocsearch start --study {name} --budget ...' or remove the folder"}
    try:
        summary = summarize(root)
    except StudyError as exc:
        return {"status": "corrupt", "message": str(exc), "summary": None}
    except Exception as exc:  # noqa: BLE001 - the dashboard shows one line, never a traceback
        return {"status": "corrupt", "summary": None,
                "message": f"study {name!r} cannot be read ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:160]}); fix: check {root}/study.json"}
    if all(t["state"] == State.QUEUED for t in summary["trials"]):
        ledger = Ledger(root / Files.LEDGER)
        ran = sorted(ledger.trial_spend())
        folders = sorted(p.name for p in (root / Files.TRIALS).glob("[0-9]*") if p.is_dir()) \
            if (root / Files.TRIALS).is_dir() else []
        url = Study.open(root.parent, name).storage_url
        db = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
        if (ran or folders) and db is not None and not db.exists():
            return {"status": "corrupt", "summary": summary,
                    "message": f"study {name!r} has {len(folders) or len(ran)} trial record(s) but its Optuna "
                               f"database {db} is missing; fix: restore optuna.db (the trial folders and "
                               f"ledger.jsonl are intact)"}
        if not (root / Files.SPACE).exists() and not folders and not ran and (db is None or not db.exists()):
            return {"status": "half_written", "summary": summary,
                    "message": f"study {name!r} is half-written: only study.json is there (no space.yaml, "
                               f"optuna.db, ledger or trial folders); fix: resume it with 'allocsearch start "
                               f"--study {name}' or remove the folder"}
        queued = len(summary["trials"])
        return {"status": "empty", "summary": summary,
                "message": f"study {name!r} has no trial yet" + (f" ({queued} queued)" if queued else "") +
                           (": its controller is running" if summary.get("controller_pid") else "")}
    return {"status": "ok", "message": None, "summary": summary}


def spend_timeline(root: str | Path, summary: dict | None = None, max_points: int = 400) -> dict[str, Any]:
    """Spend over time for the burn-down: ``{"points": [{"time", "spent", "remaining"}], "total", "unit",
    "source"}``, from the ledger's timestamped records by its own rule (``Ledger.timeline``), else (records
    without a time) from the trials' end times and their spend."""
    root = Path(root)
    summary = summary or summarize(root)
    b = summary["budget"]
    unit, total = b["unit"], b["total"]
    points = Ledger(root / Files.LEDGER).timeline(unit)
    source = "ledger"
    if not points:
        source, points, spent = "trials", [], 0.0
        for t in sorted((t for t in summary["trials"] if t["end"]), key=lambda t: t["end"]):
            spent += t["spend"]
            points.append((dt.datetime.fromisoformat(t["end"]).timestamp(), spent))
    if len(points) > max_points:  # keep the shape: every k-th point and the last one
        k = -(-len(points) // max_points)
        points = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
    return {"unit": unit, "total": total, "source": source,
            "points": [{"time": dt.datetime.fromtimestamp(t).isoformat(timespec="seconds"), "spent": s,
                        "remaining": max(0.0, total - s)} for t, s in points]}


def anytime_curve(records: list[TrialRecord], noise: float | None = None) -> list[dict]:
    """The study's best so far (``confidence.best_of``: its mean over seeds) against the device-seconds spent
    so far, trials in the order they ended: one point per ended trial (``number``, ``state``, ``objective``,
    ``device_seconds``, ``best``, ``best_trial``); ``noise``: the study's declared seed noise."""
    ended = sorted((r for r in records if r.end and r.state not in State.LIVE), key=lambda r: (r.end, r.number))
    out, spent = [], 0.0
    for i, r in enumerate(ended):
        spent += r.spend or 0.0
        best = best_of(ended[:i + 1], noise)
        out.append({"number": r.number, "state": r.state, "objective": r.objective, "device_seconds": spent,
                    "best": best.value if best else None, "best_trial": best.trial if best else None,
                    "summary": r.summary})
    return out


def running_now(summary: dict) -> list[dict]:
    """Trials running or queued now: spend so far, prediction, latest checkpoint."""
    out = []
    for t in summary["trials"]:
        if t["state"] not in State.LIVE:
            continue
        inter = t["intermediate"] or {}
        step = max(inter, default=None)
        out.append({"number": t["number"], "state": t["state"], "summary": t["summary"], "spend": t["spend"],
                    "predicted": t["predicted"], "last_step": step,
                    "last_objective": inter.get(step) if step is not None else None, "start": t["start"]})
    return out


def trials_table(trials: list[dict], objectives: list[str] | None = None) -> list[dict]:
    """Flat rows for the trials table: the row fields (a run's ``seed``, and the trial whose configuration
    it ``confirms`` when it is a confirmation run), one column per objective and per parameter."""
    names = metric_names(objectives or ["accuracy"])
    rows = []
    for t in trials:
        row = {"number": t["number"], "state": t["state"], "method": t["params"].get("method") or
               (t["summary"].split(" ", 1)[0] if t["summary"] else None), "objective": t["objective"],
               "seed": t["seed"], "confirms": t["confirm_of"], "retry_of": t["retry_of"]}
        for i, name in enumerate(names[1:], start=1):
            row[name] = t["values"][i] if t["values"] and len(t["values"]) > i else None
        row.update({"device_seconds": t["spend"], "steps": t["steps"], "trainable_params": t["trainable_params"],
                    "summary": t["summary"], "experts": " ".join(map(str, t["experts"])) if t["experts"] else "",
                    "prior": t["prior"], "reason": t["reason"], "start": t["start"], "end": t["end"]})
        for key, value in t["params"].items():
            if key != "method":
                row[key] = value
        rows.append(row)
    return rows


def controller_pid(root: str | Path) -> int | None:
    """The pid of the controller searching the study now (None: not running, or no readable study)."""
    root = Path(root)
    try:
        return Study.open(root.parent, root.name).running_pid()
    except (StudyError, OSError, KeyError):
        return None
