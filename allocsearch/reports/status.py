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
from allocsearch.study.ledger import Ledger
from allocsearch.study.folder import Study, StudyError, metric_names
from allocsearch.study.records import STATES, best_of, state_of

STATE_ORDER = STATES


def optuna_trials(study: Study) -> list:
    """The study's Optuna ``FrozenTrial``s ([] before the first trial). A storage that cannot be read (not
    an sqlite file, an empty file, unreachable) is a one-line ``StudyError``; nothing is created or written."""
    storage = study.storage_url
    if storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///"):])
        if not path.exists():
            return []  # created, no trial yet
        _check_sqlite(path, study.name)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        ostudy = optuna.load_study(study_name=study.name, storage=storage)
        return ostudy.get_trials(deepcopy=False)
    except KeyError:
        return []
    except Exception as exc:  # noqa: BLE001 - a corrupt or unreachable storage is one line
        raise StudyError(f"cannot read the Optuna storage of study {study.name!r} ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:120]}); fix: check {storage}") from None


def _check_sqlite(path: Path, name: str) -> None:
    """Refuse what is not an sqlite database before Optuna opens it (it would create tables in an empty
    file: a write)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise StudyError(f"cannot read {path} ({exc.strerror}); fix: check its permissions") from None
    if head != b"SQLite format 3\x00":
        what = "empty" if not head else "not an sqlite database"
        raise StudyError(f"the Optuna storage of study {name!r} ({path}) is {what}; fix: restore optuna.db "
                         f"from a backup or start a new study with another --study name")


def load_trials(study: Study) -> list[dict[str, Any]]:
    """One row per Optuna trial: number, state, objective, values, params, summary, spend, reason, ..."""
    frozen = optuna_trials(study)
    spend = study.ledger.trial_spend() if frozen else {}
    rows = []
    for t in frozen:
        attrs = t.user_attrs
        state, reason = state_of(t)
        objective = t.values[0] if t.values else attrs.get("objective")
        rows.append({"number": t.number, "state": state, "objective": objective,
                     "values": list(t.values) if t.values else None, "params": dict(t.params),
                     "summary": attrs.get("summary", ""), "prior": attrs.get("prior"),
                     "seed": attrs.get("seed", 0), "confirm": attrs.get("confirm"),
                     "retry_of": attrs.get("retry_of"), "spend": spend.get(t.number, 0.0),
                     "predicted": attrs.get("predicted_cost"), "steps": attrs.get("steps"),
                     "trainable_params": attrs.get("trainable_params"),
                     "reason": reason,
                     "experts": attrs.get("experts"), "intermediate": dict(t.intermediate_values),
                     "start": t.datetime_start.isoformat() if t.datetime_start else None,
                     "end": t.datetime_complete.isoformat() if t.datetime_complete else None})
    return rows


def summarize(root: str | Path) -> dict[str, Any]:
    """Everything ``status`` prints, as a JSON-able dict."""
    root = Path(root)
    study = Study.open(root.parent, root.name)
    s = study.settings
    budget = Budget.from_dict(s["budget"])
    spent = Ledger(root / "ledger.jsonl").spent(budget.unit)
    trials = load_trials(study)
    counts = {state: sum(t["state"] == state for t in trials) for state in STATE_ORDER}
    completed = [t for t in trials if t["state"] == "completed" and t["objective"] is not None]
    best = best_of(trials, s.get("noise"))
    predicted = [t["predicted"] for t in trials if t["predicted"]]
    baseline = next((t for t in completed if (t["prior"] or "").lower().startswith("lora")), None)
    out = {"study": study.name, "root": str(root), "model": s["model"], "space": s.get("space"),
           "objectives": s["objectives"], "sampler": s.get("sampler"), "scheduler": s.get("scheduler"),
           "budget": {"text": budget.text, "unit": budget.unit, "total": budget.seconds, "spent": spent,
                      "fraction": spent / budget.seconds if budget.seconds else None,
                      "overshoot": max(0.0, spent - budget.seconds),
                      "predicted_per_trial": statistics.median(predicted[-10:]) if predicted else None,
                      "describe": budget.describe(), "spent_text": budget.format(spent)},
           "counts": counts, "trials": trials, "best": best, "baseline": baseline,
           "controller_pid": study.running_pid(), "declared_noise": s.get("noise"),
           "confirm": float(s.get("confirm") or 0.0)}
    if len(s["objectives"]) == 1:
        out["evidence"] = _evidence(trials, s.get("noise"))
        if s.get("scheduler", "asha") == "asha":
            from allocsearch.search.rungs import agreement

            out["rungs"] = agreement(trials)
    if len(s["objectives"]) > 1:
        out["pareto"] = pareto_front(completed, s["objectives"])
    return out


def _evidence(trials: list[dict], noise: float | None) -> dict | None:
    """The winner's evidence (``allocsearch.study.confidence.evidence``), with each finalist's summary line."""
    from allocsearch.study.confidence import evidence

    ev = evidence(trials, noise)
    if ev is None:
        return None
    summaries = {t["number"]: t["summary"] for t in trials}
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


def pareto_front(trials: list[dict], objectives: list[str]) -> list[dict]:
    """The completed trials no other completed trial beats on every objective."""
    from allocsearch.study.folder import directions

    signs = [1.0 if d == "maximize" else -1.0 for d in directions(objectives)]
    pts = [(t, [sg * v for sg, v in zip(signs, t["values"])]) for t in trials if t["values"]]

    def dominated(p, q):  # q dominates p
        return all(b >= a for a, b in zip(p, q)) and any(b > a for a, b in zip(p, q))

    front = [t for t, p in pts if not any(dominated(p, q) for _, q in pts)]
    return sorted(front, key=lambda t: -t["values"][0])


def list_studies(workdir: str | Path) -> list[str]:
    return Study.list(workdir)


def objective_names(objectives: list[str]) -> list[str]:
    return metric_names(objectives)



# ------------------------------------------------------------------------------------------ the dashboard
# What the dashboard pages show, as plain JSON-able values. A study that cannot be read becomes a
# message (``inspect_study``), never an exception the page has to handle.
_STUDY_FILES = ("study.json", "space.yaml", "optuna.db", "ledger.jsonl", "trials")


def study_dirs(workdir: str | Path) -> list[str]:
    """Folders of ``workdir`` that hold a study, complete or not (``list_studies`` only lists complete
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
    for name in ("study.json", "optuna.db", "optuna.db-journal", "ledger.jsonl", "controller.lock", "STOP"):
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
    if not (root / "study.json").is_file():
        return {"status": "half_written", "summary": None,
                "message": f"study {name!r} is half-written: {root}/study.json is missing (a start that was "
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
    if all(t["state"] == "queued" for t in summary["trials"]):
        ledger = Ledger(root / "ledger.jsonl")
        ran = sorted(ledger.trial_spend())
        folders = sorted(p.name for p in (root / "trials").glob("[0-9]*") if p.is_dir()) \
            if (root / "trials").is_dir() else []
        url = Study.open(root.parent, name).storage_url
        db = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
        if (ran or folders) and db is not None and not db.exists():
            return {"status": "corrupt", "summary": summary,
                    "message": f"study {name!r} has {len(folders) or len(ran)} trial record(s) but its Optuna "
                               f"database {db} is missing; fix: restore optuna.db (the trial folders and "
                               f"ledger.jsonl are intact)"}
        if not (root / "space.yaml").exists() and not folders and not ran and (db is None or not db.exists()):
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
    "source"}``, from the ledger's timestamped records (the budget's own accounting), else (records
    without a time) from the trials' start and end times and their spend."""
    root = Path(root)
    summary = summary or summarize(root)
    b = summary["budget"]
    unit, total = b["unit"], b["total"]
    points: list[tuple[float, float]] = []
    trial_max: dict[tuple[int, int], float] = {}
    session_max: dict[int, float] = {}
    timed = True
    for rec in Ledger(root / "ledger.jsonl").records():
        if not isinstance(rec.get("time"), (int, float)):
            timed = False
            break
        if rec["kind"] == "trial":
            key = (int(rec["number"]), int(rec["session"]))
            trial_max[key] = max(trial_max.get(key, 0.0), float(rec["seconds"]) * float(rec["devices"]))
        else:
            session_max[int(rec["session"])] = max(session_max.get(int(rec["session"]), 0.0), float(rec["seconds"]))
        spent = sum(session_max.values()) if unit == "wall" else sum(trial_max.values())
        points.append((float(rec["time"]), spent))
    source = "ledger"
    if not timed or not points:
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


def anytime_curve(trials: list[dict], noise: float | None = None) -> list[dict]:
    """Best completed objective so far against the device-seconds spent so far, trials in the order they
    ended: one point per ended trial (``number``, ``state``, ``objective``, ``device_seconds``, ``best``);
    ``noise``: the study's declared seed noise (``summarize``'s ``declared_noise``), as ``best_of`` takes it."""
    ended = sorted((t for t in trials if t["end"] and t["state"] not in ("running", "queued")),
                   key=lambda t: (t["end"], t["number"]))
    out, spent = [], 0.0
    for i, t in enumerate(ended):
        spent += t["spend"] or 0.0
        best = best_of(ended[:i + 1], noise)
        out.append({"number": t["number"], "state": t["state"], "objective": t["objective"],
                    "device_seconds": spent, "best": best["objective"] if best else None, "summary": t["summary"]})
    return out


def running_now(summary: dict) -> list[dict]:
    """Trials running or queued now: spend so far, prediction, latest checkpoint."""
    out = []
    for t in summary["trials"]:
        if t["state"] not in ("running", "queued"):
            continue
        inter = t["intermediate"] or {}
        step = max(inter, default=None)
        out.append({"number": t["number"], "state": t["state"], "summary": t["summary"], "spend": t["spend"],
                    "predicted": t["predicted"], "last_step": step,
                    "last_objective": inter.get(step) if step is not None else None, "start": t["start"]})
    return out


def trials_table(trials: list[dict], objectives: list[str] | None = None) -> list[dict]:
    """Flat rows for the trials table: the row fields, one column per objective and per parameter."""
    names = metric_names(objectives or ["accuracy"])
    rows = []
    for t in trials:
        row = {"number": t["number"], "state": t["state"], "method": t["params"].get("method") or
               (t["summary"].split(" ", 1)[0] if t["summary"] else None), "objective": t["objective"]}
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
