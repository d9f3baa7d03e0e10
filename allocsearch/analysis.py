"""Read-only queries over study directories: what ``allocsearch status`` (and the dashboard) show.

Nothing here writes: a study that is running, finished, half-written or missing its Optuna database is
summarised as far as it can be, and problems come back as one-line ``StudyError`` messages.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from allocsearch.search.budget import Budget
from allocsearch.search.ledger import Ledger
from allocsearch.search.study import Study, StudyError, metric_names

# Optuna state -> ours, where the trial's own "state" attribute does not say more
_STATES = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
           "WAITING": "queued"}
STATE_ORDER = ("completed", "pruned", "failed", "crashed", "not_run", "running", "queued")


def load_trials(study: Study) -> list[dict[str, Any]]:
    """One row per Optuna trial: number, state, objective, values, params, summary, spend, reason, ..."""
    storage = study.storage_url
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        return []  # created, no trial yet
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        ostudy = optuna.load_study(study_name=study.name, storage=storage)
    except KeyError:
        return []
    except Exception as exc:  # noqa: BLE001 - a corrupt or unreachable storage is one line
        raise StudyError(f"cannot read the Optuna storage of study {study.name!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}); fix: check {storage}") from None
    spend = study.ledger.trial_spend()
    rows = []
    for t in ostudy.get_trials(deepcopy=False):
        attrs = t.user_attrs
        state = _STATES.get(t.state.name, t.state.name.lower())
        if state in ("failed", "running") and attrs.get("state") in ("crashed", "not_run", "failed"):
            state = attrs["state"] if state == "failed" else state
        objective = t.values[0] if t.values else attrs.get("objective")
        rows.append({"number": t.number, "state": state, "objective": objective,
                     "values": list(t.values) if t.values else None, "params": dict(t.params),
                     "summary": attrs.get("summary", ""), "prior": attrs.get("prior"),
                     "retry_of": attrs.get("retry_of"), "spend": spend.get(t.number, 0.0),
                     "predicted": attrs.get("predicted_cost"), "steps": attrs.get("steps"),
                     "trainable_params": attrs.get("trainable_params"),
                     "reason": attrs.get("failure") or attrs.get("stop_reason"),
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
    best = max(completed, key=lambda t: t["objective"], default=None)
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
           "controller_pid": study.running_pid()}
    if len(s["objectives"]) > 1:
        out["pareto"] = pareto_front(completed, s["objectives"])
    return out


def pareto_front(trials: list[dict], objectives: list[str]) -> list[dict]:
    """The completed trials no other completed trial beats on every objective."""
    from allocsearch.search.study import directions

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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
